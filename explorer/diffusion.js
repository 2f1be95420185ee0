// The noise process and the sampler of ddpm/diffusion.py, ported once to JavaScript for the page.
//
//   w(t)    = max_noise * t / T                       noise weight, t in {0, ..., T}
//   x_t     = (1 - w) * x0 + w * eps                  forward (noising) process, eps ~ N(0, I)
//   x0_hat  = clamp(unet(x_t, t), -1, 1)              the network predicts the clean image
//   eps_hat = (x_t - (1 - w_t) * x0_hat) / w_t        the noise that x0_hat implies
//   x_s     = (1 - w_s) * x0_hat + sqrt(w_s^2 - c^2) * eps_hat + c * z     one DDIM step, t -> s
//   c       = eta * (w_s / w_t) * sqrt(w_t^2 - ((1 - w_t) / (1 - w_s))^2 * w_s^2)
//
// Images are Float32Arrays of C * H * W numbers in (C, H, W) order, a batch one after another.
// Nothing here knows about networks: `model(x, t)` is any async function that returns x0_hat.
// tests/test_explorer.py runs these functions in the browser against the Python ones.

// Python's round(): halves go to the even neighbour, so that the grid is the same as Python's.
export function roundHalfEven(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

// w(t) = max_noise * t / T (NoiseSchedule.w)
export function noiseWeight(t, schedule) {
  return (schedule.max_noise * t) / schedule.num_timesteps;
}

// Evenly spaced integer timesteps t_start = s_N > ... > s_1 > s_0 = 0, with N = steps (timestep_grid)
export function timestepGrid(tStart, steps) {
  if (steps < 1 || steps > Math.max(tStart, 1)) {
    throw new RangeError(`cannot take ${steps} steps from t=${tStart}: choose 1 to ${Math.max(tStart, 1)} steps`);
  }
  const grid = [];
  for (let k = steps; k >= 0; k--) grid.push(roundHalfEven((tStart * k) / steps));
  return grid;
}

// x_t = (1 - w) * x0 + w * eps, one w for every number (NoiseSchedule.add_noise for one level)
export function addNoise(x0, w, eps) {
  const x = new Float32Array(x0.length);
  for (let i = 0; i < x.length; i++) x[i] = (1 - w) * x0[i] + w * eps[i];
  return x;
}

// One step of the generalised DDIM sampler from level wT down to wS (ddim_step). `noise` is z, only for eta > 0.
export function ddimStep(x, x0Hat, wT, wS, eta = 0, noise = null) {
  const out = new Float32Array(x.length);
  if (eta === 0) {
    for (let i = 0; i < x.length; i++) {
      const epsHat = (x[i] - (1 - wT) * x0Hat[i]) / wT;
      out[i] = (1 - wS) * x0Hat[i] + wS * epsHat;
    }
    return out;
  }
  const c = eta * (wS / wT) * Math.sqrt(Math.max(wT ** 2 - ((1 - wT) / (1 - wS)) ** 2 * wS ** 2, 0));
  const keep = Math.sqrt(Math.max(wS ** 2 - c ** 2, 0));
  for (let i = 0; i < x.length; i++) {
    const epsHat = (x[i] - (1 - wT) * x0Hat[i]) / wT;
    out[i] = (1 - wS) * x0Hat[i] + keep * epsHat + c * noise[i];
  }
  return out;
}

export function clamp(x) {
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = Math.min(1, Math.max(-1, x[i]));
  return out;
}

// Denoise x from timestep tStart in `steps` steps (diffusion.denoise); returns the last x0_hat.
// `onStep({s, w, x, x0Hat})` is called after each prediction; `gaussian(n)` draws the fresh noise z for eta > 0.
export async function denoise(model, x, tStart, schedule, steps = 1, { eta = 0, gaussian = null, onStep = null } = {}) {
  const grid = timestepGrid(tStart, steps);
  let x0Hat = null;
  for (let k = 0; k + 1 < grid.length; k++) {
    const s = grid[k];
    const sNext = grid[k + 1];
    x0Hat = clamp(await model(x, s));
    const w = noiseWeight(s, schedule);
    if (onStep) await onStep({ s, w, x, x0Hat });
    if (sNext === 0) break;
    const z = eta > 0 ? gaussian(x.length) : null;
    x = ddimStep(x, x0Hat, w, noiseWeight(sNext, schedule), eta, z);
  }
  return x0Hat;
}

// x0_guided = x0_uncond + S * (x0_cond - x0_uncond) (guided_x0 of ddpm/guidance.py)
export function guidedX0(x0Uncond, x0Cond, scale) {
  if (scale === 0) return x0Uncond;
  if (scale === 1) return x0Cond;
  const out = new Float32Array(x0Cond.length);
  for (let i = 0; i < out.length; i++) out[i] = x0Uncond[i] + scale * (x0Cond[i] - x0Uncond[i]);
  return out;
}

// PSNR in dB of images in [-1, 1]: 10 * log10(1 / MSE) on the [0, 1] scale (ddpm/metrics.py, psnr)
export function psnr(image, reference) {
  let sum = 0;
  for (let i = 0; i < image.length; i++) sum += ((image[i] - reference[i]) / 2) ** 2;
  const mse = sum / image.length;
  return mse === 0 ? Infinity : 10 * Math.log10(1 / mse);
}

// A seeded stream of standard Gaussian numbers: mulberry32 uniforms through the Box-Muller transform.
// It is not PyTorch's generator, so the page's noise for a seed is not ddpm_infer.py's: the page's
// results are compared with PyTorch on the page's own x_t.
export function gaussianStream(seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let r = state;
    r = Math.imul(r ^ (r >>> 15), r | 1);
    r ^= r + Math.imul(r ^ (r >>> 7), r | 61);
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
  };
  let spare = null;
  return (n) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      if (spare !== null) {
        out[i] = spare;
        spare = null;
        continue;
      }
      const u1 = 1 - uniform(); // in (0, 1]: log(u1) is finite
      const u2 = uniform();
      const radius = Math.sqrt(-2 * Math.log(u1));
      out[i] = radius * Math.cos(2 * Math.PI * u2);
      spare = radius * Math.sin(2 * Math.PI * u2);
    }
    return out;
  };
}
