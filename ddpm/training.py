"""The training loop: fit the U-Net to a data set under the noise process of diffusion.py.

Each step takes a batch of images from the data set (data.batch_stream; with
one image, that image B times), draws for each a timestep t ~ Uniform{0, ..., T}
and fresh noise eps, and takes one Adam step on MSE(unet(x_t, t), x0)
(DDPM, Algorithm 1, with x0 as the target).

Three standard aids make the short run converge further; the learning rate
passed in is the peak:

* warm-up: the learning rate rises linearly over the first steps, so the
  first updates (taken with Adam's still-empty moment estimates) stay small;
* cosine decay from the peak to zero by the last step (Loshchilov & Hutter,
  SGDR, 2017), so the final steps settle into a minimum instead of
  bouncing around it;
* gradient-norm clipping at 1.0 guards against the rare huge gradient.

A network with a canvas (``UNet(canvas_size=...)``, a learned picture added to
the output) trains the canvas at CANVAS_LR_SCALE times the learning rate.
Adam moves each parameter by about the learning rate per step, whatever the
size of its gradient. A convolution weight serves every pixel, so small moves
suffice; a canvas pixel must travel up to 2 (from 0 to a colour in [-1, 1])
by itself, and at 1e-3, warmed up and decayed, 1000 steps carry it about 0.5.

A generator keeps an exponential moving average (EMA) of its weights beside
them, and samples with the average (``EMA``). In a process group started by
torchrun, each process trains on its share of the batch and
DistributedDataParallel averages the gradients, so every process takes the
same step.

On a CPU or a CUDA GPU, Adam runs as one fused kernel over all parameters and
the gradient norm is taken with one multi-tensor call (``foreach``), instead
of a handful of small operations per parameter tensor; same update, less
overhead per step.
"""

import copy
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.unet_model import UNet

from .data import ImageTensors, LabelledImages, batch_stream, per_process_batch
from .diffusion import loss_weights, training_losses
from .distributed import rank_and_world_size
from .guidance import drop_labels
from .precision import autocast

WARMUP_STEPS = 100
GRAD_CLIP_NORM = 1.0
PROGRESS_EVERY = 25  # steps between updates of the progress bar's loss
MULTI_TENSOR_DEVICES = ("cpu", "cuda")  # where fused Adam and foreach clipping exist
CANVAS_LR_SCALE = 10  # the canvas's learning rate, as a multiple of the network's
EMA_WARMUP = 10  # the EMA's decay at update k is min(decay, (1 + k) / (EMA_WARMUP + k))


def learning_rate_factor(step, total_steps, warmup_steps=WARMUP_STEPS):
    """Multiplier of the peak learning rate at 0-based ``step``: linear warm-up, then cosine to 0."""
    warmup_steps = min(warmup_steps, max(total_steps // 10, 1))  # short runs warm up for 10%
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteLoss(Exception):
    """The loss became nan or inf: the weights are ruined and must not be saved."""

    def __init__(self, step, value):
        super().__init__(f"the loss became {value} at step {step}")
        self.step, self.value = step, value


RANK_SEED_STRIDE = 0x9E3779B1  # odd, so seed + rank * stride (mod 2^32) differs for every rank


def rank_seed(seed, rank):
    """The seed of the generator that draws process ``rank``'s t and eps; process 0's is ``seed`` itself.

    Every process must draw different noise, or they would all train on the same t and eps and the
    second process would add nothing. The CPU generator keeps only the low 32 bits of a seed
    (seed and seed + 2^32 give the same numbers), so the ranks are spread out within 32 bits.
    """
    return (seed + rank * RANK_SEED_STRIDE) % 2**32


class EMA:
    """An exponential moving average of a model's weights: the weights a generator samples with.

    After every optimizer step, theta_ema <- d * theta_ema + (1 - d) * theta. Late in training
    the weights still jitter from batch to batch (each batch is a different handful of images
    at different noise levels); their average is smoother and samples look cleaner (DDPM sec. 4
    and appendix B; Song & Ermon 2020). One image at a time is the other way round: every batch
    holds the same picture, so the weights settle by themselves, and the denoiser keeps EMA off.

    The decay warms up, d_k = min(decay, (1 + k) / (EMA_WARMUP + k)): averaging 1,000 steps
    back is pointless while step 0 is random, so early on the average follows the weights
    closely (d = 0.1 at k = 0, 0.91 at k = 90, 0.991 at k = 990).
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, updates_so_far):
        """Move the average towards ``model``'s weights; ``updates_so_far`` is k, the updates before this one."""
        d = min(self.decay, (1 + updates_so_far) / (EMA_WARMUP + updates_so_far))
        average, current = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(average, current, 1 - d)  # average + (1 - d) * (current - average)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


class Trainer:
    """One training run, holding everything needed to continue it exactly.

    That is the weights (in ``model``), their EMA if there is one, Adam's
    moment estimates, the position of the learning-rate schedule, the state of
    the random generator that draws every t and eps, the step counter and the
    losses so far. The position in the data follows from the step counter.
    ``state_dict()`` returns all of it but the weights, ``load_state_dict()``
    puts it back, so a run stopped at step k and resumed ends with the same
    weights as a run that was never stopped.

    ``data`` is a Dataset of (C, H, W) images in [-1, 1], or a tensor of them,
    (N, C, H, W): one image is N = 1. ``batch_size`` counts the images of a
    step across all processes; ``data_seed`` orders the images (data.batch_stream),
    ``generator`` draws t and eps.

    A conditional network (built with num_classes) is given ``labels``, (N,) the class of each
    image, and shown each with no class at the rate ``label_dropout`` (guidance.drop_labels,
    drawn from ``generator`` too).

    ``precision`` "bf16" runs each step's forward pass under a bf16 autocast (ddpm/precision.py); the
    weights, Adam's state and the loss stay float32.

    ``t_density`` is how each image's t is drawn (NoiseSchedule.sample_timesteps). ``snr_gamma``
    above 1 weights each image's x0 error by clamp(SNR(t), 1, snr_gamma) in the gradient
    (diffusion.loss_weights); the losses kept and shown stay the plain x0 errors, so runs with and
    without it compare.
    """

    def __init__(self, model, data, schedule, train_steps, lr, batch_size=1, generator=None, ema_decay=0.0,
                 data_seed=0, labels=None, label_dropout=0.0, precision="fp32", snr_gamma=1.0,
                 t_density="uniform"):
        self.model, self.schedule, self.train_steps = model, schedule, train_steps
        self.device = next(model.parameters()).device
        self.dataset = ImageTensors(data) if torch.is_tensor(data) else data
        if (labels is None) != (getattr(model, "null_class", None) is None):
            raise ValueError("a conditional network trains with labels, and only a conditional one")
        self.labels, self.label_dropout = labels, label_dropout
        self.precision = precision  # of the forward pass: fp32, or bf16 autocast (ddpm/precision.py)
        if not snr_gamma >= 1:
            raise ValueError(f"snr_gamma must be at least 1 (1: no weighting), got {snr_gamma}")
        self.snr_gamma = snr_gamma
        self.t_density = t_density  # checked where t is drawn, NoiseSchedule.sample_timesteps
        self.rank, self.world_size = rank_and_world_size()
        self.batch_size = per_process_batch(batch_size, self.world_size)  # this process's share
        self.data_seed, self.batches = data_seed, None  # the batches start where the run is, in run()
        # Every process starts from the same weights (DDP also copies rank 0's at wrapping) and, since
        # the gradients are averaged, takes the same step; `network` is what the loss calls.
        self.network = DistributedDataParallel(model) if self.world_size > 1 else model
        self.generator = generator if generator is not None else torch.Generator(device=self.device)
        self.ema = EMA(model, ema_decay) if ema_decay > 0 else None
        self.multi_tensor = self.device.type in MULTI_TENSOR_DEVICES
        self.optimizer = torch.optim.Adam(parameter_groups(model, lr), lr=lr, fused=self.multi_tensor or None)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, train_steps)
        )
        self.step = 0  # steps done
        # Histories stay on the device and are read back only now and then, not every step.
        # Preallocated buffers, not lists of loss tensors: those would keep each step's graph alive.
        self.losses = torch.zeros(train_steps, device=self.device)  # batch mean, per step (all processes)
        self.image_t = torch.zeros(train_steps, dtype=torch.long, device=self.device)  # t of the batch's
        self.image_losses = torch.zeros(train_steps, device=self.device)  # first image, and its loss
        self.stop_requested = False  # set by Ctrl-C in this process
        self.stopping = False  # with several processes: all of them agreed to stop after this step

    def sampling_model(self):
        """The weights to sample with: the EMA if the run keeps one, else the trained weights."""
        return self.ema.model if self.ema is not None else self.model

    def next_batch(self):
        """The next batch of clean images x0, (B, C, H, W), and their classes (B,) or None, on the model's device."""
        if self.batches is None:
            stream = batch_stream(len(self.dataset), self.batch_size, self.data_seed, self.rank, self.world_size,
                                  start_step=self.step)
            dataset = self.dataset if self.labels is None else LabelledImages(self.dataset, self.labels)
            self.batches = iter(DataLoader(dataset, batch_sampler=stream))
        if self.labels is None:
            return next(self.batches).to(self.device), None
        x0, labels = next(self.batches)
        return x0.to(self.device), labels.to(self.device)

    def train_step(self):
        """One Adam step on a fresh (t, eps) draw (DDPM Algorithm 1, x0 as the target), and for a conditional
        network a fresh draw of which classes to hide (Ho and Salimans, Algorithm 1)."""
        x0, labels = self.next_batch()
        if labels is not None:
            labels = drop_labels(labels, self.model.null_class, self.label_dropout, generator=self.generator)
        with autocast(self.precision, self.device):  # the forward pass only; backward follows its dtypes
            image_losses, t = training_losses(self.network, x0, self.schedule, generator=self.generator, y=labels,
                                              t_density=self.t_density)
        loss = image_losses.mean()  # the x0 error, what the run reports
        objective = loss
        if self.snr_gamma != 1:  # the loss the gradient follows: each image's x0 error weighted by its SNR
            objective = (loss_weights(self.schedule, t, self.snr_gamma) * image_losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()  # under DDP, also averages the gradients of all processes
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM, foreach=self.multi_tensor or None)
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.losses[self.step] = self._agree(loss.detach())
        self.image_t[self.step], self.image_losses[self.step] = t[0], image_losses[0].detach()
        self.step += 1

    def _agree(self, loss):
        """The whole step's loss (the mean over processes); and whether every process stops now.

        A process must not stop alone: the others would wait for it in their next gradient
        exchange forever. So a Ctrl-C seen by any process is shared in the same message as the loss.
        """
        if self.world_size == 1:
            return loss
        shared = torch.stack([loss, torch.tensor(float(self.stop_requested), device=loss.device)])
        dist.all_reduce(shared)  # sum over processes
        self.stopping = bool(shared[1] > 0)
        return shared[0] / self.world_size

    def run(self, save_every=0, on_save=None, eval_every=0, on_eval=None, show_progress=True):
        """Train until the last step or until request_stop(). Returns True if the run is complete.

        Every ``save_every`` steps (0: never) ``on_save(self)`` is called, after
        checking that no loss so far was nan or inf (NonFiniteLoss otherwise).
        Every ``eval_every`` steps, and after the last, ``on_eval(self)`` is called
        (0: never); it may return a dict to show beside the loss in the progress bar.
        Every process calls them; only process 0 shows progress.
        """
        shown = {}
        self.model.train()
        with tqdm(total=self.train_steps, initial=self.step, desc="training", unit="step",
                  disable=not show_progress or self.rank != 0) as bar:  # closed, ending its line, even on an error
            while self.step < self.train_steps and not self.should_stop():
                self.train_step()
                bar.update()
                last = self.step == self.train_steps
                due_eval = eval_every and (self.step % eval_every == 0 or last)
                due_progress = self.step % PROGRESS_EVERY == 0 or last
                due_save = save_every and self.step % save_every == 0 and not last
                if due_eval or due_progress or due_save:
                    self.check_finite()  # one host sync, before anything looks at or saves the model
                if due_eval:
                    shown = on_eval(self) or {}
                    self.model.train()  # evaluation may have switched the model to eval mode
                if due_progress:
                    recent = self.losses[max(self.step - PROGRESS_EVERY, 0) : self.step].mean().item()
                    bar.set_postfix(loss=f"{recent:.5f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.1e}", **shown)
                if due_save:
                    on_save(self)
        self.check_finite()
        return self.step == self.train_steps

    def should_stop(self):
        """One process stops as soon as asked; several stop at the step they all agreed on (see _agree)."""
        return self.stop_requested if self.world_size == 1 else self.stopping

    def request_stop(self):
        """Ask run() to return after the step in progress (safe to call from a signal handler)."""
        self.stop_requested = True

    def check_finite(self):
        """Raise NonFiniteLoss naming the first step (1-based) whose loss was nan or inf."""
        bad = torch.nonzero(~torch.isfinite(self.losses[: self.step]))
        if len(bad):
            first = int(bad[0])
            raise NonFiniteLoss(first + 1, self.losses[first].item())

    def loss_history(self):
        """The mean loss of every step so far."""
        return self.losses[: self.step].tolist()

    def final_loss(self, last=100):
        """The mean loss of the last ``last`` steps: what a run reports as its result."""
        recent = self.losses[max(self.step - last, 0) : self.step]
        return recent.double().mean().item()

    def noise_history(self):
        """(t, loss) of the first image of every step so far: how hard each noise level is."""
        return {"t": self.image_t[: self.step].tolist(), "loss": self.image_losses[: self.step].tolist()}

    def state_dict(self):
        """Everything but the weights that continuing the run needs; plain data and tensors.

        The random states are per process (each draws its own t and eps), so with more than one
        process every process must call this: they are gathered into lists indexed by rank.
        """
        mine = {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            mine["cuda_rng"] = torch.cuda.get_rng_state_all()
        everyone = [mine]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, {k: _to_cpu(v) for k, v in mine.items()})
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator_device": self.generator.device.type,
            "world_size": self.world_size,
            # per rank: the generator that draws every t and eps, and the global CPU (and CUDA) generator
            "random_states": everyone,
        }
        return state

    def load_state_dict(self, state, loss_history, noise_history):
        """Continue the run that ``state`` (from state_dict) and the histories describe."""
        if state["generator_device"] != self.generator.device.type:
            raise ValueError(
                f"the run was saved on {state['generator_device']} and cannot continue exactly on "
                f"{self.generator.device.type}"
            )
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(f"the run was saved with {state.get('world_size', 1)} processes and this is "
                             f"{self.world_size} (run it with torchrun --nproc_per_node "
                             f"{state.get('world_size', 1)} to continue it exactly)")
        if state["step"] != len(loss_history) or not 0 < state["step"] < self.train_steps:
            raise ValueError(f"step {state['step']} does not fit a run of {self.train_steps} steps")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        mine = state["random_states"][self.rank]
        self.generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        self.step = state["step"]
        self.batches = None  # the data continues from the new step
        self.losses[: self.step] = torch.tensor(loss_history, device=self.losses.device)
        self.image_t[: self.step] = torch.tensor(noise_history["t"], device=self.losses.device)
        self.image_losses[: self.step] = torch.tensor(noise_history["loss"], device=self.losses.device)


def step_activation_bytes(model, batch_size, img_size):
    """Bytes that one training step of ``model`` keeps for its backward pass: what grows with the batch.

    Measured, not guessed: the network runs once on tensors of the "meta" device, which have shapes
    and no data (so this takes no memory and little time), while a saved-tensors hook adds up every
    tensor that autograd keeps for the backward pass. On the CPU that sum came within 10% of a real
    step's peak (256 px, batch 1 and 16; 64 px, batch 64).
    """
    with torch.device("meta"):
        shadow = UNet(**model.config)
        x_t = torch.zeros(batch_size, shadow.config["in_channels"], img_size, img_size)
        t = torch.zeros(batch_size, dtype=torch.long)
    kept = 0

    def count(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        shadow(x_t, t)
    return kept


def _to_cpu(value):
    return [v.cpu() for v in value] if isinstance(value, list) else value.cpu()


def parameter_groups(model, lr):
    """Adam's parameter groups: the network at ``lr``; a canvas, if the model has one, at CANVAS_LR_SCALE * lr."""
    canvas = [p for name, p in model.named_parameters() if name == "canvas"]
    network = [p for name, p in model.named_parameters() if name != "canvas"]
    return [{"params": network}] + ([{"params": canvas, "lr": lr * CANVAS_LR_SCALE}] if canvas else [])
