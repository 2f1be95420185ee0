"""The training loop: fit the U-Net to one image under the noise process of diffusion.py.

Each step draws, for every copy of the image in the batch, a timestep
t ~ Uniform{0, ..., T} and fresh noise eps, and takes one Adam step on
MSE(unet(x_t, t), x0) (DDPM, Algorithm 1, with x0 as the target).

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

On a CPU or a CUDA GPU, Adam runs as one fused kernel over all parameters and
the gradient norm is taken with one multi-tensor call (``foreach``), instead
of a handful of small operations per parameter tensor; same update, less
overhead per step.
"""

import math

import torch
from tqdm import tqdm

from .diffusion import training_losses

WARMUP_STEPS = 100
GRAD_CLIP_NORM = 1.0
PROGRESS_EVERY = 25  # steps between updates of the progress bar's loss
MULTI_TENSOR_DEVICES = ("cpu", "cuda")  # where fused Adam and foreach clipping exist
CANVAS_LR_SCALE = 10  # the canvas's learning rate, as a multiple of the network's


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


class Trainer:
    """One training run on one image, holding everything needed to continue it exactly.

    That is the weights (in ``model``), Adam's moment estimates, the position
    of the learning-rate schedule, the state of the random generator that
    draws every t and eps, the step counter and the losses so far.
    ``state_dict()`` returns all of it but the weights, ``load_state_dict()``
    puts it back, so a run stopped at step k and resumed ends with the same
    weights as a run that was never stopped.
    """

    def __init__(self, model, x0, schedule, train_steps, lr, batch_size=1, generator=None):
        self.model, self.schedule, self.train_steps = model, schedule, train_steps
        self.x0_batch = x0.expand(batch_size, -1, -1, -1)  # (B, C, H, W): the same image B times, no copy
        self.generator = generator if generator is not None else torch.Generator(device=x0.device)
        self.multi_tensor = x0.device.type in MULTI_TENSOR_DEVICES
        self.optimizer = torch.optim.Adam(parameter_groups(model, lr), lr=lr, fused=self.multi_tensor or None)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, train_steps)
        )
        self.step = 0  # steps done
        # Histories stay on the device and are read back only now and then, not every step.
        # Preallocated buffers, not lists of loss tensors: those would keep each step's graph alive.
        self.losses = torch.zeros(train_steps, device=x0.device)  # batch mean, per step
        self.image_t = torch.zeros(train_steps, dtype=torch.long, device=x0.device)  # t of the batch's
        self.image_losses = torch.zeros(train_steps, device=x0.device)  # first image, and its loss
        self.stop_requested = False

    def train_step(self):
        """One Adam step on a fresh (t, eps) draw (DDPM Algorithm 1, x0 as the target)."""
        image_losses, t = training_losses(self.model, self.x0_batch, self.schedule, generator=self.generator)
        loss = image_losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM, foreach=self.multi_tensor or None)
        self.optimizer.step()
        self.lr_schedule.step()
        self.losses[self.step] = loss.detach()
        self.image_t[self.step], self.image_losses[self.step] = t[0], image_losses[0].detach()
        self.step += 1

    def run(self, save_every=0, on_save=None, eval_every=0, on_eval=None, show_progress=True):
        """Train until the last step or until request_stop(). Returns True if the run is complete.

        Every ``save_every`` steps (0: never) ``on_save(self)`` is called, after
        checking that no loss so far was nan or inf (NonFiniteLoss otherwise).
        Every ``eval_every`` steps, and after the last, ``on_eval(self)`` is called
        (0: never); it may return a dict to show beside the loss in the progress bar.
        """
        shown = {}
        self.model.train()
        with tqdm(total=self.train_steps, initial=self.step, desc="training", unit="step",
                  disable=not show_progress) as bar:  # closed, ending its line, even on an error
            while self.step < self.train_steps and not self.stop_requested:
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
        """Everything but the weights that continuing the run needs; plain data and tensors."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),  # draws every t and eps
            "generator_device": self.generator.device.type,
            "torch_rng": torch.get_rng_state(),  # the global CPU generator
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state, loss_history, noise_history):
        """Continue the run that ``state`` (from state_dict) and the histories describe."""
        if state["generator_device"] != self.generator.device.type:
            raise ValueError(
                f"the run was saved on {state['generator_device']} and cannot continue exactly on "
                f"{self.generator.device.type}"
            )
        if state["step"] != len(loss_history) or not 0 < state["step"] < self.train_steps:
            raise ValueError(f"step {state['step']} does not fit a run of {self.train_steps} steps")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.losses[: self.step] = torch.tensor(loss_history, device=self.losses.device)
        self.image_t[: self.step] = torch.tensor(noise_history["t"], device=self.losses.device)
        self.image_losses[: self.step] = torch.tensor(noise_history["loss"], device=self.losses.device)


def parameter_groups(model, lr):
    """Adam's parameter groups: the network at ``lr``; a canvas, if the model has one, at CANVAS_LR_SCALE * lr."""
    canvas = [p for name, p in model.named_parameters() if name == "canvas"]
    network = [p for name, p in model.named_parameters() if name != "canvas"]
    return [{"params": network}] + ([{"params": canvas, "lr": lr * CANVAS_LR_SCALE}] if canvas else [])


def train(model, x0, schedule, train_steps, lr, batch_size=1, generator=None, show_progress=True):
    """Train ``model`` in place on the single image ``x0`` (1, C, H, W). Returns the per-step losses.

    ``generator`` drives every random draw of t and eps, so a seeded run repeats exactly.
    """
    trainer = Trainer(model, x0, schedule, train_steps, lr, batch_size=batch_size, generator=generator)
    trainer.run(show_progress=show_progress)
    return trainer.loss_history()
