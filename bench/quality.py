"""Quality yardstick on the embedded digits model: FD-digits and prompt accuracy.

(a) FD-digits: 50 images per digit (500, fixed seeds) are mapped to 8x8 grey values in [0, 1] like
    the dataset, projected with a 20-component PCA fitted on all 1,797 real digits, and compared
    with the real digits by the Frechet distance between the two Gaussians. The floor is the same
    distance between two random halves of the real digits.
(b) Prompt accuracy: a classifier trained on 75% of the dataset (its held-out accuracy is reported)
    labels the generated images; accuracy = share labelled with the prompted digit. It saturates
    easily (a blurry class mean is still classified right), so FD-digits is the primary number.

Every pipeline option can be varied, so later work reports its quality cost here:

    python bench/quality.py                               # default settings
    python bench/quality.py --steps 1 2 4 8 16 --json q.json
    python bench/quality.py --sampler heun --cfg 2 --pipeline-arg auto_resize=false
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = ["a handwritten {w}", "the digit {d}", "number {w}"]
PER_DIGIT = 50


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16.0, data.target  # [1797, 64] in [0, 1]


def _unupsample(side: int) -> torch.Tensor:
    """[64, side*side]: the least-squares inverse of the bilinear x(side/8) upsampling that built the
    training images from the 8x8 digits (tools/train_tiny.py), so real digits map back exactly
    (an area average instead would blur them: FD 0.41 between the real digits and their round trip)."""
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    up = torch.nn.functional.interpolate(basis, size=(side, side), mode="bilinear", align_corners=False)
    return torch.linalg.pinv(up.reshape(64, side * side).T)


def to_digit_space(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, 64] grey in [0, 1] at 8x8, like the dataset."""
    grey = torch.tensor(images, dtype=torch.float64).mean(-1).reshape(len(images), -1) / 255.0
    return (grey @ _unupsample(images.shape[1]).T).clamp(0, 1).numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


class Yardstick:
    """PCA and classifier fitted once on the real digits."""

    def __init__(self, seed: int = 0):
        from sklearn.decomposition import PCA
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        self.x, self.y = real_digits()
        self.pca = PCA(n_components=20, random_state=seed).fit(self.x)
        x_tr, x_te, y_tr, y_te = train_test_split(self.x, self.y, test_size=0.25, random_state=seed, stratify=self.y)
        self.classifier = SVC(gamma=0.02, C=10).fit(x_tr, y_tr)
        self.classifier_accuracy = float((self.classifier.predict(x_te) == y_te).mean())
        half = np.random.default_rng(seed).permutation(len(self.x))
        self.fd_floor = frechet(self.pca.transform(self.x[half[::2]]), self.pca.transform(self.x[half[1::2]]))

    def score(self, generated: np.ndarray, labels: np.ndarray) -> dict:
        return {
            "fd_digits": frechet(self.pca.transform(generated), self.pca.transform(self.x)),
            "prompt_accuracy": float((self.classifier.predict(generated) == labels).mean()),
        }


def generate(pipe, per_digit: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for d in range(10):
        for j, template in enumerate(PROMPTS):  # the prompts share the digit's images evenly
            n = per_digit // len(PROMPTS) + (j < per_digit % len(PROMPTS))
            out = pipe(
                template.format(w=NUMBER_WORDS[d], d=d),
                num_images_per_prompt=n,
                seed=100_000 * d + 1_000 * j,
                output_type="np",
                **kwargs,
            )
            images.append(out.images)
            labels += [d] * n
    return to_digit_space(np.concatenate(images)), np.array(labels)


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    import fastflow
    from fastflow.loading.components import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, nargs="*", default=[None], help="one row per value (default: the model's)")
    parser.add_argument("--sampler", default=None, choices=["euler", "heun", "dpmpp_2m"])
    parser.add_argument("--cfg", type=float, default=None, help="true CFG scale (default: the model's)")
    parser.add_argument("--per-digit", type=int, default=PER_DIGIT)
    parser.add_argument(
        "--pipeline-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further pipeline keyword (e.g. a caching policy), repeatable",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    pipe = fastflow.load(args.model, device="cpu", dtype=getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    stick = Yardstick()
    extra = dict(kv.split("=", 1) for kv in args.pipeline_arg)
    extra = {k: _value(v) for k, v in extra.items()}
    rows = []
    print(
        f"classifier held-out accuracy {stick.classifier_accuracy:.3f}; FD floor (real half vs half) "
        f"{stick.fd_floor:.3f}"
    )
    print(f"{'steps':>5} {'sampler':>9} {'cfg':>5} {'FD-digits':>10} {'accuracy':>9} {'seconds':>8}")
    for steps in args.steps:
        t0 = time.perf_counter()
        kwargs = {"num_inference_steps": steps, "sampler": args.sampler, "true_cfg_scale": args.cfg, **extra}
        generated, labels = generate(pipe, args.per_digit, **kwargs)
        row = {
            "steps": steps or pipe.defaults["steps"],
            "sampler": args.sampler or pipe.defaults["sampler"],
            "cfg": args.cfg if args.cfg is not None else pipe.defaults.get("true_cfg", 1.0),
            "extra": extra,
            **stick.score(generated, labels),
            "seconds": time.perf_counter() - t0,
            "images": len(labels),
            "classifier_accuracy": stick.classifier_accuracy,
            "fd_floor": stick.fd_floor,
            "model": args.model,
        }
        rows.append(row)
        print(
            f"{row['steps']:>5} {row['sampler']:>9} {row['cfg']:>5} {row['fd_digits']:>10.3f} "
            f"{row['prompt_accuracy']:>9.3f} {row['seconds']:>8.1f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
