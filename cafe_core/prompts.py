"""The chat template's special strings and CAFe's embedding instructions (SPEC section 1), defined once.

No imports: the configuration's defaults, the tokenizer, the model inputs and the evaluation sets all read
these. (MMEB's own image placeholder, Phi-3-V's `<|image_1|>`, is MMEB_IMAGE_TOKEN.)
"""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"  # LLaVA-OneVision's placeholder for an image's tokens
VIDEO_TOKEN = "<video>"
MMEB_IMAGE_TOKEN = "<|image_1|>"  # what MMEB-eval's files write where the image goes

SYSTEM = "You are a helpful assistant."
IMAGE_PROMPT = "Compress this image in one word:"
TEXT_PROMPT = "Compress this sentence in one word:"

# The generative benchmarks' instructions (LLaVA's evaluation prompts), which the training data asks too.
DESCRIBE = "Describe the image in detail."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
