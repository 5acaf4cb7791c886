"""Two torchrun "nodes" on this machine (two launchers, one process each, joined by a c10d rendezvous)
train the same model, with the same logged losses, as one process with the same global batch: a
multi-node job without the network.  Both nodes share the run directory, as on a shared filesystem."""

import subprocess
import sys

from tests.integration.helpers import ENV, assert_same_training, pretune
from tests.integration.test_distributed import COMMON

PORT = 29615  # the rendezvous endpoint (295xx are the other torchrun tests')


def test_two_nodes_equal_one_process(tmp_path):
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    pretune("pretrain", "recipes/text-mlm.yaml", f"run_dir={single}", *COMMON, "trainer.batch_size=8")
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{PORT}", "--rdzv-id", "pretune-multinode-test",
            "-m", "pretune", "pretrain", "recipes/text-mlm.yaml", f"run_dir={nodes}", *COMMON, "trainer.batch_size=4"]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    launchers = [subprocess.Popen(node, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True) for log in logs]
    try:
        codes = [launcher.wait(timeout=600) for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(output[-3000:] for output in outputs)
    assert sum("model saved to" in output for output in outputs) == 1  # rank 0 ran on one node, rank 1 on the other
    assert "2 process(es)" in "".join(outputs)

    assert_same_training(single, nodes)
