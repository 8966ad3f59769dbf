"""The release components of promote.mode ci: the parity check and the promotion request run their stages
on the run's configuration and publish what the stages return (stages faked; the stages themselves are
tested with the release stage layer)."""

from __future__ import annotations

from pathlib import Path

import pytest

import components
from cafe_core import stages
from cafe_core.config import load_config
from tests.test_stages import artifacts, fake


def test_verify_release_and_request_promotion_publish_their_stage_results(tmp_path, monkeypatch):
    run_config = load_config("configs/local.yaml", [f"root={tmp_path}", "run_id=c2", "promote.mode=ci"]).to_yaml()
    calls: list = []
    monkeypatch.setattr(stages.release, "verify_release", fake("verify", calls))
    monkeypatch.setattr(stages.release, "request_promotion", fake("request", calls))
    out = artifacts(tmp_path, "decision_record", "model", "parity", "request")
    components.verify_release.python_func(run_config=run_config, decision_record=out["decision_record"],
                                          model=out["model"], parity=out["parity"])
    components.request_promotion.python_func(run_config=run_config, decision_record=out["decision_record"],
                                             parity=out["parity"], request=out["request"])
    assert calls == [("verify", {}), ("request", {})]
    assert Path(out["parity"].path).read_text() == f"{tmp_path}/runs/c2/verify\n"
    assert out["parity"].metadata["uri"] == f"{tmp_path}/runs/c2/verify" and out["parity"].metadata["n"] == 1
    assert out["request"].metadata["uri"] == f"{tmp_path}/runs/c2/request"



def test_a_parity_mismatch_fails_the_step_after_publishing_the_record(tmp_path, monkeypatch, capsys):
    run_config = load_config("configs/local.yaml", [f"root={tmp_path}", "run_id=c3", "promote.mode=ci"]).to_yaml()
    monkeypatch.setattr(stages.release, "verify_release", fake("verify", [], failure="verify-release: files differ"))
    out = artifacts(tmp_path, "decision_record", "model", "parity")
    with pytest.raises(SystemExit) as ended:
        components.verify_release.python_func(run_config=run_config, decision_record=out["decision_record"],
                                              model=out["model"], parity=out["parity"])
    assert ended.value.code == 1  # as `cafe verify-release` on a failed check: nothing gets requested
    assert "verify-release: files differ" in capsys.readouterr().err
    assert out["parity"].metadata["uri"] == f"{tmp_path}/runs/c3/verify"  # the record is still there to read
