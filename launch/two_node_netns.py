#!/usr/bin/env python
"""Two test "nodes" on one machine: Linux network namespaces joined by a veth pair, each with its own address,
and a 2-node run started across them the way a cluster starts one (root only).

    sudo python launch/two_node_netns.py [--launcher deepspeed|torchrun] [--ranks-per-node 2] -- SCRIPT [ARGS...]
    sudo python launch/two_node_netns.py -- launch/train.py --config configs/demo.yaml --set train.deepspeed_config=ds_configs/zero3.json

Node 0 is 10.77.0.1, node 1 is 10.77.0.2 (nothing else is addressed). `deepspeed` runs the DeepSpeed
launcher on each node with a hostfile listing both, `--no_ssh --node_rank R --master_addr 10.77.0.1`;
`torchrun` runs `torchrun --nnodes 2 --node_rank R --master_addr 10.77.0.1`. gloo is pinned to the veth
(GLOO_SOCKET_IFNAME). Both nodes share this machine's filesystem, as cluster nodes share a run folder.
Each node's output is prefixed with its name; the exit status is the first non-zero one. The namespaces
are removed afterwards, also when the run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

SUBNET = "10.77.0"
MASTER_PORT = 29611


class NetnsError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextmanager
def two_hosts(tag: str | None = None):
    """Yields [(namespace, interface, address)] for node 0 and node 1; always tears them down."""
    if shutil.which("ip") is None:
        raise NetnsError("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root")
    tag = tag or str(os.getpid() % 100000)
    nodes = [(f"mm{tag}n{i}", f"mm{tag}v{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    created = []
    try:
        for ns, _, _ in nodes:
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])
        for ns, dev, addr in nodes:
            _ip("link", "set", dev, "netns", ns)
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def node_command(launcher: str, node_rank: int, ranks_per_node: int, hostfile: Path, script: list[str]) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                "--master_addr", f"{SUBNET}.1", "--master_port", str(MASTER_PORT), *script]
    return [str(bin_dir / "torchrun"), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", str(ranks_per_node),
            "--master_addr", f"{SUBNET}.1", "--master_port", str(MASTER_PORT), *script]


def _stream(name: str, pipe) -> None:
    for line in pipe:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()


def run_two_nodes(launcher: str, script: list[str], ranks_per_node: int = 2, timeout_s: float | None = None) -> int:
    with two_hosts() as nodes, tempfile.TemporaryDirectory(prefix="two-node-") as work:
        hostfile = Path(work) / "hostfile"
        hostfile.write_text("".join(f"{addr} slots={ranks_per_node}\n" for _, _, addr in nodes))
        procs, threads = [], []
        for rank, (ns, dev, _) in enumerate(nodes):
            env = os.environ | {"GLOO_SOCKET_IFNAME": dev, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            cmd = ["ip", "netns", "exec", ns, *node_command(launcher, rank, ranks_per_node, hostfile, script)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(proc)
            threads.append(threading.Thread(target=_stream, args=(f"node{rank}", proc.stdout), daemon=True))
            threads[-1].start()
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for t in threads:
                t.join(timeout=5)
        return next((c for c in codes if c), 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--timeout", type=float, help="seconds before both nodes are killed")
    p.add_argument("script", nargs=argparse.REMAINDER, help="after --: the training script and its arguments")
    args = p.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        p.error("give the training script after --, e.g. -- launch/train.py --config configs/demo.yaml")
    try:
        return run_two_nodes(args.launcher, script, args.ranks_per_node, args.timeout)
    except NetnsError as e:
        print(f"two_node_netns: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
