"""What the server loads and where it listens, without Ray: checkpoints and indexes are read
weights-only (a pickle placed where weights belong is refused and never runs), the endpoint binds
to localhost unless told otherwise, and the app's arguments are checked before anything starts."""

import os
import pathlib
import pickle
import signal
import time

import numpy as np
import pytest
import torch

from pipelines.cli import build_parser
from recsys.models import build_model, get_spec
from recsys.semantic_ids import SemanticIdIndex
from recsys.training.checkpoint import WEIGHTS, load_model, save_checkpoint
from serve.launch import STOP_SIGNALS, exposure_warning, stop_signals_interrupt
from serve.schemas import ServeArgs


class Payload:
    """Unpickling this writes a file: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


@pytest.fixture
def checkpoint(tmp_path) -> pathlib.Path:
    config = get_spec("sasrec").config_cls(d_model=8, n_layers=1, n_heads=1, d_ff=16)
    model = build_model("sasrec", config, n_items=10, max_len=4)
    return save_checkpoint(tmp_path / "best", model, "sasrec")


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"item_emb.weight": Payload(marker)}, checkpoint / WEIGHTS)  # a torch pickle, not safetensors
    with pytest.raises(ValueError, match="not a valid safetensors file .* never unpickled"):
        load_model(checkpoint)
    assert not marker.exists()
    # the control: an unpickling loader does run it, so the check above can fail
    payload = tmp_path / "payload.pt"  # torch.load reads a *.safetensors name as safetensors
    payload.write_bytes((checkpoint / WEIGHTS).read_bytes())
    torch.load(payload, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_checkpoint_holding_only_a_pickle_is_not_a_checkpoint(checkpoint):
    (checkpoint / WEIGHTS).unlink()
    torch.save({}, checkpoint / "model.pt")
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS} is missing"):
        load_model(checkpoint)


def test_a_semantic_id_index_with_pickled_arrays_is_refused(tmp_path):
    index = SemanticIdIndex(item_ids=torch.arange(1, 5), codes=torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]]),
                            codebook_sizes=[2, 2])
    directory = index.save(tmp_path / "index")
    np.save(directory / "full_ids.npy", np.array([Payload(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        SemanticIdIndex.load(directory)
    assert not (tmp_path / "pwned").exists()
    pickle.loads(pickle.dumps(Payload(tmp_path / "pwned")))  # the control: unpickling runs it
    assert (tmp_path / "pwned").exists()


def test_recsys_serve_binds_localhost_by_default_and_warns_otherwise():
    ns = build_parser().parse_args(["serve", "runs/train/x"])
    assert ns.host == "127.0.0.1" and ns.port == 8000 and ns.api_key_env is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    warning = exposure_warning("0.0.0.0", None)
    assert "reachable from other machines" in warning and "--api-key-env" in warning
    assert "--api-key-env" not in exposure_warning("10.0.0.5", "MY_KEY")


def test_recsys_serve_stops_on_sigint_and_sigterm_even_when_it_inherited_an_ignored_sigint():
    """A command started in the background by a non-interactive shell inherits SIGINT ignored, and
    Python then installs no Ctrl-C handler (2026-12-07: `recsys serve` started so never stopped)."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `bash -c 'recsys serve ... &'` hands down

    def not_replaced(signum, frame):  # rather than SIGTERM's default, which would end pytest
        raise AssertionError("SIGTERM reached the handler from before serving")

    signal.signal(signal.SIGTERM, not_replaced)
    try:
        for signum in STOP_SIGNALS:
            with pytest.raises(KeyboardInterrupt):
                with stop_signals_interrupt():
                    os.kill(os.getpid(), signum)
                    time.sleep(5)  # the handler raises here at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the inherited handlers come back
        assert signal.getsignal(signal.SIGTERM) is not_replaced
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_serve_args_are_checked_with_messages_that_name_the_field():
    with pytest.raises(ValueError, match="max_batch_sise"):
        ServeArgs(run_dir="r", max_batch_sise=4)
    with pytest.raises(ValueError, match="retrieval"):
        ServeArgs(run_dir="r", retrieval="knn")
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeArgs(run_dir="r", max_body_bytes=10)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_replica'\]"):
        ServeArgs(run_dir="r", autoscaling_config={"min_replicas": 1, "max_replica": 4})
    with pytest.raises(ValueError, match="max_replicas"):  # values: Serve's own AutoscalingConfig schema
        ServeArgs(run_dir="r", autoscaling_config={"min_replicas": 3, "max_replicas": 2})
    args = ServeArgs(run_dir="r", autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert args.num_replicas is None
