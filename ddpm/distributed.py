"""Many processes: which one this is, and joining the process group that torchrun starts.

torchrun starts one copy of a script per process and tells each, in its environment,
its RANK (0, 1, ...), the WORLD_SIZE (how many there are), its LOCAL_RANK on this machine
and where to meet (MASTER_ADDR, MASTER_PORT). A script run with plain python is rank 0 of 1.
init_process_group reads the same variables, so before and after joining they are the one
answer to "which process am I".
"""

import os

import torch
import torch.distributed as dist

from .errors import UserError


def rank_and_world_size():
    """(rank, world size) of this process, as torchrun set them: (0, 1) when it runs alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process():
    """True in process 0, the one that prints and writes files; the others would only repeat it."""
    return rank_and_world_size()[0] == 0


def join_processes(device):
    """Under torchrun (a world of more than one): join the process group. Returns the device to use.

    Pitfalls worth knowing:
    * the backend: gloo runs on CPUs, NCCL on CUDA GPUs (one GPU per process, cuda:LOCAL_RANK);
    * threads: K processes on a C-core machine should use C / K threads each, or they fight for
      the cores. torchrun sets OMP_NUM_THREADS=1 unless you set it; on 2 cores, 2 processes of 1
      thread is right. Set OMP_NUM_THREADS yourself on bigger machines;
    * the rendezvous address: on one machine it is the loopback address, 127.0.0.1, and a port
      (29500 by default). Two runs at once need different ports (torchrun --standalone picks a
      free one), and where gloo picks a network card the others cannot reach, set
      GLOO_SOCKET_IFNAME=lo.
    """
    if rank_and_world_size()[1] == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"more than one process runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wait_for_everyone():
    """A barrier: no process goes on before all have reached this point (nothing to wait for alone)."""
    if dist.is_initialized():
        dist.barrier()


def main_process_outcome(failure):
    """Process 0's failure message (None: it succeeded), made known to every process.

    Only process 0 writes files. When its write fails, the others must stop too, with the same
    one-line error, instead of waiting for it at the next step and dying with a traceback.
    Every process must call this at the same point.
    """
    if not dist.is_initialized():
        return failure
    shared = [failure]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def launcher(script):
    """How ``script`` was started, as a user would type it: python script, or torchrun --nproc_per_node K script."""
    return launcher_for(rank_and_world_size()[1], script)


def launcher_for(processes, script="ddpm_train.py"):
    """How to start ``script`` in ``processes`` processes: python script, or torchrun --nproc_per_node K script."""
    return (["python"] if processes == 1 else ["torchrun", "--nproc_per_node", str(processes)]) + [script]
