"""A second Ray node on this machine, on loopback, joined to the head at argv[1] (`ray start --address` refuses to
start one bound to 127.0.0.1: it swaps loopback for the machine's address). It runs until SIGTERM, then its raylet
and workers go with it. Ray's own ray.cluster_utils.Cluster starts its extra nodes the same way."""
import signal
import sys
import time

from ray._private.node import Node
from ray._private.parameter import RayParams

params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0,
                   object_store_memory=150 * 2**20, include_log_monitor=False, node_manager_port=0,
                   min_worker_port=0, max_worker_port=0)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("joined", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
