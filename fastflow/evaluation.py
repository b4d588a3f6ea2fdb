"""Measuring image quality without a reference dataset on disk: FD-digits and prompt accuracy of
the embedded digits model (scikit-learn's digits are the real distribution), and PSNR / SSIM to a
reference image for any model. Used by bench/quality.py, bench/caching.py and the tuners.

Needs scikit-learn and scipy (``pip install scikit-learn``) for FD-digits.
"""

from __future__ import annotations

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
    """Images [N, H, W, 3] (uint8, or ``output_type="np"`` floats, taken as the 8-bit values a PNG
    would store) -> [N, 64] grey in [0, 1] at 8x8, like the dataset."""
    from .pipelines.images import as_uint8

    images = as_uint8(images)
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


def generate(
    pipe, per_digit: int, stats: list | None = None, seed_offset: int = 0, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """``per_digit`` images of each digit (fixed seeds, the prompts sharing them evenly) in the
    dataset's 8x8 space, and their labels; ``stats`` collects each call's ``out.stats``;
    ``seed_offset`` moves every seed (e.g. calibration images distinct from the scored ones)."""
    images, labels = [], []
    for d in range(10):
        for j, template in enumerate(PROMPTS):  # the prompts share the digit's images evenly
            n = per_digit // len(PROMPTS) + (j < per_digit % len(PROMPTS))
            if n == 0:  # fewer images than prompts
                continue
            out = pipe(
                template.format(w=NUMBER_WORDS[d], d=d),
                num_images_per_prompt=n,
                seed=100_000 * d + 1_000 * j + seed_offset,
                output_type="np",
                **kwargs,
            )
            images.append(out.images)
            labels += [d] * n
            if stats is not None:
                stats.append(out.stats)
    return to_digit_space(np.concatenate(images)), np.array(labels)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float | None = None) -> float:
    """PSNR of ``a`` against ``b`` (peak: ``b``'s range by default; latents have no fixed range)."""
    a, b = a.double(), b.double()
    mse = (a - b).pow(2).mean().item()
    peak = float(b.max() - b.min()) if peak is None else peak
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of images [B, C, H, W] in [0, 1]: Gaussian window (11 px, sigma 1.5, or the image
    size if smaller) over the valid region, constants of Wang et al. 2004."""
    a, b = a.double(), b.double()
    size = min(11, a.shape[-1], a.shape[-2])
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] @ g[None, :]).expand(a.shape[1], 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
