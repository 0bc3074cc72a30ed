"""scripts/profile_kernels.py: bad numbers are one-line argparse errors (exit 2) before any model is built,
and the shared-prompt update's micro-batch is whole groups (its profile needs a GPU: docs/benchmarks.md)."""
from __future__ import annotations

import pytest

from helpers import load_script


@pytest.mark.parametrize("argv, words", [
    (["update", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["update", "--batch", "10", "--group-size", "6", "--update-layout", "shared_prompt"],
     "--batch 10 is not a whole number of groups of --group-size 6"),
    (["generate", "--new-tokens", "-1"], "--new-tokens must be >= 1"),
])
def test_bad_numbers_are_one_line_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        load_script("profile_kernels").main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_shared_prompt_update_runs_whole_groups_once(capsys):
    """--small on the CPU: the profiled shared-prompt micro-batch is one group of 2 rows sharing a prompt,
    and its gradient counts both rows' completion tokens."""
    profile = load_script("profile_kernels")
    args = profile.build_parser().parse_args(["update", "--small", "--update-layout", "shared_prompt"])
    run, meta = profile.build_update(args)
    assert meta["update_layout"] == "shared_prompt" and meta["group_size"] == 2
    (loss, aux), grads = run()
    assert float(aux["n_tokens"]) == 2 * 8  # both rows' 8 completion tokens
    assert float(abs(grads["q_proj"]["delta_s"]).max()) > 0



def test_realistic_lengths_update_matches_its_stated_tokens():
    """--lengths realistic (as bench_phase3.py's realistic micro-batches): the group's prompt is drawn
    around --prompt-len, the rows are cut to a multiple of 128, and the loss counts exactly the drawn
    completion tokens."""
    profile = load_script("profile_kernels")
    args = profile.build_parser().parse_args(["update", "--small", "--update-layout", "shared_prompt",
                                              "--lengths", "realistic"])
    run, meta = profile.build_update(args)
    assert meta["lengths"] == "realistic" and meta["row_positions"] == 2 * 128
    prompt = (meta["tokens"] - meta["completion_tokens"]) // 2
    assert 6 <= prompt <= 10 and meta["linear_positions"] >= prompt + meta["completion_tokens"]
    (loss, aux), grads = run()
    assert float(aux["n_tokens"]) == meta["completion_tokens"] == 2 * 8
    assert float(abs(grads["q_proj"]["delta_s"]).max()) > 0
