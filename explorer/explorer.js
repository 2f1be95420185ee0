// The explorer: the shipped networks (exported by ddpm_export.py) run live by onnxruntime-web on WebAssembly.
//
// window.explorer is the page's contract, which tests/test_explorer.py drives in headless Chromium:
//   ready                               a Promise, resolved when every network is loaded
//   denoise({t, seed, steps})           -> {w, x_t, x0_hat, ...} for the demo image, flat (C, H, W) arrays
//   generate({label, guidance, steps, seed, count, eta})  -> {samples: count flat (C, H, W) arrays}
// The buttons and sliders of index.html call the same two functions.

import * as ort from "./vendor/onnxruntime-web/ort.wasm.min.mjs";
import * as diffusion from "./diffusion.js";

const ROOT = new URL("../", import.meta.url); // the repository: model_ckpt/ and images/ lie there
const NETWORKS = {
  demo: "model_ckpt/demo_unet.onnx",
  digits: "model_ckpt/digits_unet.onnx",
  digitsCond: "model_ckpt/digits_cond_unet.onnx",
};
const DEFAULT_GUIDANCE = 2; // ddpm_sample.py's S where none is given (ddpm/guidance.py)
const DEFAULT_ETA = 1; // DDPM's fresh noise: the shipped digit samples use it (images/digits_samples)

// Two threads need a cross-origin-isolated page (ddpm_explore.py sends the headers); elsewhere one.
const asked = Number(new URLSearchParams(location.search).get("threads"));
const threads = asked >= 1 ? asked : self.crossOriginIsolated ? Math.min(2, navigator.hardwareConcurrency || 1) : 1;
ort.env.wasm.numThreads = threads;
ort.env.wasm.wasmPaths = new URL("./vendor/onnxruntime-web/", import.meta.url).href;

const stats = { threads, crossOriginIsolated: self.crossOriginIsolated, runtime: `onnxruntime-web ${ort.env.versions?.web}`,
                forwardMs: {} };

// One queue for every network call: the WebAssembly runtime runs one session at a time.
let queue = Promise.resolve();
function serially(task) {
  const result = queue.then(task);
  queue = result.catch(() => {});
  return result;
}

async function loadNetwork(key) {
  const record = await (await fetch(new URL(NETWORKS[key] + ".json", ROOT))).json();
  const bytes = await (await fetch(new URL(NETWORKS[key], ROOT))).arrayBuffer();
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  const [C, H, W] = [record.in_channels, record.img_size, record.img_size];
  // x0_hat = unet(x_t, t[, y]) for a batch: x (B * C * H * W numbers), one timestep for all, classes ys (B,)
  const run = (x, t, ys = null) => serially(async () => {
    const B = x.length / (C * H * W);
    const feeds = {
      x_t: new ort.Tensor("float32", x, [B, C, H, W]),
      t: new ort.Tensor("float32", new Float32Array(B).fill(t), [B]),
    };
    if (record.num_classes !== null) {
      const classes = ys ?? new Array(B).fill(record.num_classes); // none given: "no class"
      feeds.y = new ort.Tensor("int64", BigInt64Array.from(classes, BigInt), [B]);
    }
    const start = performance.now();
    const output = await session.run(feeds);
    stats.forwardMs[key] = performance.now() - start;
    return output.x0_hat.data;
  });
  return { record, run, shape: [C, H, W], schedule: record.noise_config };
}

// The demo image x0 in [-1, 1], (C, H, W), exactly as ddpm/imaging.py reads it: byte / 255 * 2 - 1
async function loadImage(path, size) {
  const blob = await (await fetch(new URL(path, ROOT))).blob();
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(size, size);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0, size, size);
  const rgba = context.getImageData(0, 0, size, size).data;
  const x = new Float32Array(3 * size * size);
  for (let p = 0; p < size * size; p++) {
    for (let c = 0; c < 3; c++) x[c * size * size + p] = (rgba[4 * p + c] / 255) * 2 - 1;
  }
  return x;
}

const networks = {};
let demoImage = null;
const ready = (async () => {
  for (const key of Object.keys(NETWORKS)) networks[key] = await loadNetwork(key);
  const { record } = networks.demo;
  demoImage = await loadImage(record.image, record.img_size);
})();

// A sampler's onStep that records the ms of each step (from the previous one) in stepMs, then calls `onStep`
function stepTimer(onStep) {
  const stepMs = [];
  let last = performance.now();
  const timed = async (step) => {
    const now = performance.now();
    stepMs.push(now - last);
    last = now;
    if (onStep) await onStep(step);
  };
  return { stepMs, timed };
}

// The median ms of a call's steps; the first step, which also warms the runtime up, counts only when alone
function msPerStep(stepMs) {
  const sorted = (stepMs.length > 1 ? stepMs.slice(1) : stepMs).sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
}

// Noise the demo image to timestep t with the noise of `seed`, and denoise it in `steps` DDIM steps (eta = 0),
// as ddpm_infer.py does: x_t = (1 - w) x0 + w eps, then x0_hat = clamp(unet(x_t, t), -1, 1) and re-noising.
async function denoise({ t = 500, seed = 0, steps = 1, onStep = null } = {}) {
  await ready;
  const net = networks.demo;
  const w = diffusion.noiseWeight(t, net.schedule);
  const eps = diffusion.gaussianStream(seed)(demoImage.length);
  const xT = diffusion.addNoise(demoImage, w, eps);
  const { stepMs, timed } = stepTimer(onStep);
  const model = (x, s) => net.run(x, s);
  const x0Hat = await diffusion.denoise(model, xT, t, net.schedule, steps, {
    onStep: timed,
  });
  return {
    t, w, steps, seed,
    x0: Array.from(demoImage),
    x_t: Array.from(xT),
    x0_hat: Array.from(x0Hat),
    psnr_x_t: diffusion.psnr(diffusion.clamp(xT), demoImage), // what a screen shows, as ddpm_infer.py measures
    psnr_x0_hat: diffusion.psnr(x0Hat, demoImage),
    step_ms: stepMs,
    ms_per_step: msPerStep(stepMs),
    threads,
  };
}

// A conditional network asked for `labels` at guidance scale S (ddpm/guidance.py, Guided): both passes in one batch
function guided(net, labels, scale) {
  const K = net.record.num_classes;
  return async (x, s) => {
    if (scale === 0) return net.run(x, s); // "no class" only
    if (scale === 1) return net.run(x, s, labels);
    const both = new Float32Array(2 * x.length);
    both.set(x);
    both.set(x, x.length);
    const out = await net.run(both, s, [...labels, ...labels.map(() => K)]);
    return diffusion.guidedX0(out.subarray(x.length), out.subarray(0, x.length), scale);
  };
}

function classIndex(label, record) {
  if (label === null || label === undefined || label === "") return null;
  const names = record.classes ?? [];
  const index = names.includes(String(label)) ? names.indexOf(String(label)) : Number(label);
  if (!Number.isInteger(index) || index < 0 || index >= record.num_classes) {
    throw new RangeError(`label ${label} is not one of the classes ${names.join(", ")}`);
  }
  return index;
}

// `count` new 28 px digits from pure noise (diffusion.generate): x_T = eps, then `steps` steps from t = T.
// label null: the unconditional digit generator; a label: the conditional one, guided with scale S.
async function generate({ label = null, guidance = DEFAULT_GUIDANCE, steps = 20, seed = 0, count = 4,
                          eta = DEFAULT_ETA, onStep = null } = {}) {
  await ready;
  const cond = networks.digitsCond;
  const index = classIndex(label, cond.record);
  const net = index === null ? networks.digits : cond;
  const [C, H, W] = net.shape;
  const size = C * H * W;
  const gaussian = diffusion.gaussianStream(seed); // x_T first, then the sampler's fresh noise
  const xT = gaussian(count * size);
  const model = index === null ? (x, s) => net.run(x, s) : guided(net, new Array(count).fill(index), guidance);
  const { stepMs, timed } = stepTimer(onStep);
  const x0Hat = await diffusion.denoise(model, xT, net.schedule.num_timesteps, net.schedule, steps, {
    eta, gaussian,
    onStep: timed,
  });
  const samples = [];
  for (let k = 0; k < count; k++) samples.push(Array.from(x0Hat.subarray(k * size, (k + 1) * size)));
  return { samples, label: index, guidance: index === null ? null : guidance, steps, seed, eta,
           step_ms: stepMs, ms_per_step: msPerStep(stepMs), threads };
}

window.explorer = { ready, denoise, generate, diffusion, stats };

// ---- the page: sliders and buttons over the same two functions ----

function draw(canvas, x, [C, H, W]) {
  canvas.width = W;
  canvas.height = H;
  const context = canvas.getContext("2d");
  const image = context.createImageData(W, H);
  for (let p = 0; p < H * W; p++) {
    for (let c = 0; c < 3; c++) {
      const value = x[(C === 1 ? 0 : c) * H * W + p];
      image.data[4 * p + c] = Math.round(((Math.min(1, Math.max(-1, value)) + 1) / 2) * 255);
    }
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

const $ = (id) => document.getElementById(id);

function showStatus() {
  const ms = Object.entries(stats.forwardMs).map(([k, v]) => `${k} ${v.toFixed(0)} ms`).join(", ");
  $("status").textContent = `onnxruntime-web on WebAssembly, ${threads} thread${threads > 1 ? "s" : ""}` +
    (stats.crossOriginIsolated ? "" : " (this host sends no COOP/COEP headers: one thread)") +
    (ms ? `; last network call: ${ms}` : "");
}

let wanted = null; // the newest slider setting; older ones are skipped
let busy = false;
async function updateNoising() {
  wanted = { t: Number($("t").value), steps: Number($("steps").value), seed: Number($("seed").value) };
  if (busy) return;
  busy = true;
  try {
    while (wanted) {
      const settings = wanted;
      wanted = null;
      settings.steps = Math.min(settings.steps, Math.max(settings.t, 1));
      $("t-value").textContent = `t = ${settings.t}, w = ${diffusion.noiseWeight(settings.t, networks.demo.schedule).toFixed(3)}`;
      const result = await denoise(settings);
      const shape = networks.demo.shape;
      draw($("x0"), result.x0, shape);
      draw($("xt"), result.x_t, shape);
      draw($("x0hat"), result.x0_hat, shape);
      $("psnr-xt").textContent = `${result.psnr_x_t.toFixed(2)} dB`;
      $("psnr-x0hat").textContent = `${result.psnr_x0_hat.toFixed(2)} dB`;
      showStatus();
    }
  } finally {
    busy = false;
  }
}

async function runGeneration() {
  const button = $("generate");
  button.disabled = true;
  const label = $("label").value === "" ? null : $("label").value;
  const count = Number($("count").value);
  const grid = $("samples");
  grid.replaceChildren();
  const cells = [];
  for (let k = 0; k < count; k++) {
    const cell = document.createElement("div");
    cell.className = "sample";
    const xt = document.createElement("canvas");
    const x0 = document.createElement("canvas");
    cell.append(xt, x0);
    grid.append(cell);
    cells.push([xt, x0]);
  }
  const shape = networks.digits.shape;
  const size = shape[0] * shape[1] * shape[2];
  try {
    await generate({
      label, count,
      guidance: Number($("guidance").value),
      steps: Number($("gen-steps").value),
      seed: Number($("gen-seed").value),
      eta: Number($("eta").value),
      onStep: async ({ s, w, x, x0Hat }) => {
        cells.forEach(([xt, x0], k) => {
          draw(xt, x.subarray(k * size, (k + 1) * size), shape);
          draw(x0, x0Hat.subarray(k * size, (k + 1) * size), shape);
        });
        $("gen-step").textContent = `t = ${s}, w = ${w.toFixed(3)}`;
        showStatus();
        await new Promise(requestAnimationFrame); // let the page paint this step
      },
    });
  } finally {
    button.disabled = false;
  }
}

function wire() {
  for (const id of ["t", "steps", "seed"]) $(id).addEventListener("input", updateNoising);
  $("guidance").addEventListener("input", () => { $("guidance-value").textContent = `S = ${$("guidance").value}`; });
  $("label").addEventListener("change", () => { $("guidance").disabled = $("label").value === ""; });
  $("generate").addEventListener("click", runGeneration);
  $("guidance").disabled = $("label").value === "";
}

ready.then(() => {
  $("loading").hidden = true;
  wire();
  showStatus();
  updateNoising();
}, (error) => {
  $("loading").textContent = `Could not load the networks: ${error}. Serve the page with python ddpm_explore.py.`;
});
