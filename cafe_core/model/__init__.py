"""LLaVA-OneVision for CAFe: the project tokenizer (tokenizer.py), model/processor building and checkpoint
loading and saving (build.py), model inputs (inputs.py), the one-pass CAFe step (joint.py), and finding a
checkpoint in storage (locate.py, which needs no torch)."""
