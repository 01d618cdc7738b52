"""Every script refuses a setting it cannot run with, in one line, before it loads anything; a notebook
gets the same text as a ValueError (issue 30). The table is made from the configs' own ranges, so a
new setting with a range is tested too."""
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import DPOConfig, GRPOConfig, PPOConfig
from palm_rlhf.config import SettingError, parse_config
from palm_rlhf.reward import RewardConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {name: f"Train{kind}Config" for name, kind in
           (("train_lm", "LM"), ("train_reward", "Reward"), ("train_ppo", "PPO"), ("train_grpo", "GRPO"), ("train_dpo", "DPO"))}
SCRIPTS["evaluate"] = "EvaluateConfig"


def script_config(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return getattr(module, SCRIPTS[script])


def out_of_range(field) -> list:
    """Values just outside a field's range: (value, the reason's start)."""
    rules, cases = field.metadata, []
    if "at_least" in rules:
        cases.append((rules["at_least"] - 1 if isinstance(rules["at_least"], int) else rules["at_least"] - 0.5, "must be >="))
    if "above" in rules:
        cases.append((rules["above"], "must be >"))
    if "at_most" in rules:
        cases.append((rules["at_most"] + 1, "must be <="))
    if "choices" in rules:
        cases.append(("nonsense", "unknown"))
    return cases


CASES = [(script, field.name, value, reason)
         for script in SCRIPTS for field in dataclasses.fields(script_config(script))
         for value, reason in out_of_range(field)]


def test_the_table_covers_every_script_and_the_issue_s_cases():
    covered = {(script, name) for script, name, _, _ in CASES}
    assert {script for script, _ in covered} == set(SCRIPTS) and len(CASES) > 100
    for case in [("train_lm", "steps"), ("train_reward", "steps"), ("train_ppo", "iterations"), ("train_dpo", "beta"),
                 ("train_lm", "batch_size"), ("train_lm", "preset"), ("train_lm", "lr"), ("train_ppo", "temperature")]:
        assert case in covered, case


@pytest.mark.parametrize("script,name,value,reason", CASES, ids=[f"{s}-{n}-{v}" for s, n, v, _ in CASES])
def test_a_setting_out_of_range_ends_the_script_in_one_line(script, name, value, reason, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    with pytest.raises(SystemExit) as stop:
        parse_config(script_config(script), [f"--{name}", str(value)])
    message = str(stop.value.code)
    assert message.startswith(f"{script}.py: --{name} {value}: {reason}") and "\n" not in message, message


@pytest.mark.parametrize("config,settings,name", [
    (PPOConfig, dict(minibatch_size=64), "minibatch_size"),                      # more than the 32 responses of a batch
    (PPOConfig, dict(micro_batch_size=32), "micro_batch_size"),                   # more than the minibatch of 16
    (GRPOConfig, dict(prompts_per_step=1, group_size=8), "minibatch_size"),       # 16 > 1 x 8
    (GRPOConfig, dict(estimator="rloo", group_size=1, minibatch_size=1), "group_size"),  # no one to leave out
    (DPOConfig, dict(method="ipo", beta=0.0), "beta"),
    (RewardConfig, dict(mode="stars"), "mode"),
])
def test_relations_and_ranges_are_refused_where_the_config_is_made(config, settings, name):
    with pytest.raises(SettingError) as error:
        config(**settings)
    assert isinstance(error.value, ValueError) and error.value.name == name and str(error.value).startswith(name)


def test_a_trainer_refuses_what_its_config_refuses_with_the_same_text():
    from test_ppo import PROMPTS, count_target, tiny_palm

    from palm_rlhf import RLHFTrainer
    with pytest.raises(ValueError, match=r"^iterations -1: must be >= 1$"):
        RLHFTrainer(palm=tiny_palm(), reward_fn=count_target, prompt_token_ids=PROMPTS, iterations=-1)
    with pytest.raises(ValueError, match="the longest prompt has 4 tokens, so max_seq_len must be at least 5"):
        RLHFTrainer(palm=tiny_palm(), reward_fn=count_target, prompt_token_ids=PROMPTS, max_seq_len=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'iteration'"):
        RLHFTrainer(palm=tiny_palm(), reward_fn=count_target, prompt_token_ids=PROMPTS, iteration=3)


@pytest.mark.parametrize("args", [["train_lm.py", "--steps", "0"], ["train_ppo.py", "--temperature", "-1"],
                                  ["train_dpo.py", "--beta", "-1"], ["train_grpo.py", "--estimator", "ppo"]])
def test_the_script_exits_with_one_line_and_writes_no_run_folder(args, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:], "--out_dir", str(run)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"{args[0]}: {args[1]} {args[2]}: ") and not run.exists()


def test_a_window_without_room_for_a_response_is_refused_naming_the_longest_prompt(tmp_path, checkpoints):  # noqa: F811
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "train_ppo.py"), *checkpoints, "--max_seq_len", "3", "--out_dir", str(run)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "max_seq_len 3 leaves no room for a response: the longest prompt has" in out.stderr and not run.exists()
