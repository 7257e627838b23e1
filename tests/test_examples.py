"""The main job and the model zoo, run as a user runs them: through singa-launch, on real data."""
import re
import sys
from pathlib import Path

import pytest

from tests.dist_harness import run_command

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "launchers.launch"]


def _accuracy(output: str) -> float:
    found = re.findall(r"test accuracy: ([0-9.]+)", output)
    assert found, f"no accuracy line in the output:\n{output}"
    return float(found[-1])


def _launch_example(script, *args, flags=()):
    """`singa-launch -np 2 *flags python examples/<script> *args`, which must succeed; its completed process."""
    result = run_command(LAUNCH + ["-np", "2", *flags, sys.executable, f"examples/{script}", *args],
                         timeout=240, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_main_job_reaches_095_with_two_processes():
    result = _launch_example("digits_mlp.py", "--quiet")
    assert "[0] workers=2 strategy=allreduce" in result.stdout
    assert _accuracy(result.stdout) >= 0.95


def test_main_job_progress_bar_only_on_rank_0():
    result = _launch_example("digits_mlp.py", "--epochs", "2")
    text = result.stdout + result.stderr
    assert re.search(r"\[0\].*train:.*step", text), text
    assert not re.search(r"\[1\].*train:", text), text


def test_cnn_of_native_conv_pool_lrn_layers():
    result = _launch_example("digits_cnn.py", "--quiet")
    assert _accuracy(result.stdout) >= 0.96


def test_cnn_with_hybrid_partitioning():
    # Convolutions data parallel, dense layers model parallel across the two workers.
    result = _launch_example("digits_hybrid.py", "--quiet")
    assert "[0] workers=2 feature-split parameters: classifier.0.weight, classifier.0.bias" in result.stdout
    assert _accuracy(result.stdout) >= 0.97


def test_rbm_pretraining_then_finetuning():
    result = _launch_example("digits_rbm.py", "--epochs", "10", "--finetune-epochs", "15")
    assert _accuracy(result.stdout) >= 0.93


def test_char_rnn_learns_the_text():
    result = run_command([sys.executable, "examples/char_rnn.py", "--steps", "150", "--hidden", "64"],
                         timeout=240, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    bits = float(re.findall(r"held-out bits per character: ([0-9.]+)", result.stdout)[-1])
    # A uniform guess over the text's ~80 symbols costs about 6.3 bits per character.
    assert bits < 3.6, result.stdout


@pytest.mark.parametrize("cell", ["lstm", pytest.param("rnn", marks=pytest.mark.slow)])
def test_char_rnn_other_cells_learn_quickly(cell):
    result = run_command([sys.executable, "examples/char_rnn.py", "--cell", cell, "--steps", "40", "--hidden", "32",
                          "--unroll", "20", "--lr", "1e-2"], timeout=240, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    bits = float(re.findall(r"held-out bits per character: ([0-9.]+)", result.stdout)[-1])
    # Letter frequencies alone (a unigram model of the training text) cost about 5.0 bits per character.
    assert bits < 4.5, result.stdout


# singa-launch flags of each framework besides AllReduce (the default), on two workers.
FRAMEWORKS = {
    "sandblaster": ["--strategy", "sandblaster", "--servers", "1"],
    "downpour": ["--strategy", "downpour", "--worker-groups", "2", "--servers", "1"],
    "hogwild": ["--strategy", "hogwild", "--sync-freq", "5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[]] + list(FRAMEWORKS.values()), ids=["allreduce"] + list(FRAMEWORKS))
def test_char_rnn_under_every_framework(flags):
    """The native-GRU char-RNN through singa-launch -np 2 under every framework (-m slow: the main suite runs it as
    one process above)."""
    result = _launch_example("char_rnn.py", "--steps", "40", "--hidden", "32", "--unroll", "20", "--lr", "1e-2",
                             flags=flags)
    bits = float(re.findall(r"\[0\] .*held-out bits per character: ([0-9.]+)", result.stdout)[-1])
    assert bits < 4.5, result.stdout  # letter frequencies alone: about 5.0


@pytest.mark.parametrize("flags", list(FRAMEWORKS.values()), ids=list(FRAMEWORKS))
def test_main_job_unchanged_under_every_framework(flags):
    # The launcher starts the servers and hands every process its role; the script names no strategy.
    result = _launch_example("digits_mlp.py", "--quiet", flags=flags)
    assert f"strategy={flags[1]}" in result.stdout
    assert _accuracy(result.stdout) >= 0.95
    assert "encountered error" not in result.stdout + result.stderr  # the RPC group closes cleanly


def test_horovod_script_with_join_syncbn_grouped_allreduce_and_process_sets():
    """A horovod.torch script, only its import changed, under singa-launch -np 3 (uneven data per rank)."""
    result = run_command(LAUNCH + ["-np", "3", sys.executable, "examples/horovod_digits.py", "--epochs", "6"],
                         timeout=240, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _accuracy(result.stdout) >= 0.95
    assert "last to join: rank 2" in result.stdout  # the rank with the largest share joins last
    assert "replicas identical: True" in result.stdout
    assert re.search(r"even ranks' best test accuracy: 0\.9[5-9]", result.stdout), result.stdout


# A few epochs each: enough for a clear effect, little enough to run every example under every framework.
RBM_QUICK = ("--epochs", "5", "--finetune-epochs", "8")
# Fine-tuning starts on a plateau: after 5 epochs Hogwild's ratio after/before ranged 0.58 to 0.84 over 7 runs,
# after 10 it ranged 0.49 to 0.55 (AllReduce: 0.57 after 5).
AUTOENCODER_QUICK = ("--sizes", "64,40,10", "--pretrain-epochs", "5", "--finetune-epochs", "10")


def _check_rbm(output: str) -> None:
    mse = float(re.findall(r"reconstruction mse: ([0-9.]+)", output)[-1])
    # The best constant image (the training digits' mean) reconstructs the test digits with an error of 0.073.
    assert mse < 0.065, output
    assert _accuracy(output) >= 0.85


def _check_autoencoder(output: str) -> None:
    before = float(re.findall(r"reconstruction mse before fine-tuning: ([0-9.]+)", output)[-1])
    after = float(re.findall(r"reconstruction mse after fine-tuning: ([0-9.]+)", output)[-1])
    assert after < 0.8 * before, output


def test_autoencoder_rbm_stack_then_finetuning(tmp_path):
    png = tmp_path / "autoencoder.png"
    result = _launch_example("digits_autoencoder.py", *AUTOENCODER_QUICK, "--png", str(png))
    _check_autoencoder(result.stdout)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and f"wrote {png}" in result.stdout


# Both RBM examples under every framework; one in the default run (beside the allreduce runs above), the rest slow.
@pytest.mark.parametrize("script,framework", [
    pytest.param("digits_rbm.py", "sandblaster", marks=pytest.mark.slow),
    ("digits_autoencoder.py", "hogwild"),
    pytest.param("digits_autoencoder.py", "sandblaster", marks=pytest.mark.slow),
    pytest.param("digits_rbm.py", "downpour", marks=pytest.mark.slow),
    pytest.param("digits_autoencoder.py", "downpour", marks=pytest.mark.slow),
    pytest.param("digits_rbm.py", "hogwild", marks=pytest.mark.slow),
])
def test_rbm_examples_under_every_framework(script, framework):
    rbm = script == "digits_rbm.py"
    result = _launch_example(script, *(RBM_QUICK if rbm else AUTOENCODER_QUICK), flags=FRAMEWORKS[framework])
    (_check_rbm if rbm else _check_autoencoder)(result.stdout)
    assert "encountered error" not in result.stdout + result.stderr
