#!/usr/bin/env python3
"""
The two fits behind erf8 (ctxkv/simd.h), the 8-lane erf of the CPU program's GELU:

    .venv/bin/python dev/fit_erf.py

  |x| < 1:       erf(x) / x            = P(x^2),          P of degree 6
  1 <= |x| <= 4: erfc(x) * exp(x^2)    = R(1 / (1 + x)),  R of degree 8

Each is a least-squares fit in relative error on 600 Chebyshev nodes of its interval (in
double, against math.erf / math.erfc). Prints the coefficients, highest degree first as erf8's
Horner steps use them, and the fits' worst relative error in double. erf8 writes P as
1 + (P - 1) so that the leading term rounds well; test_ctxkv.c checks erf8 in ulp.
"""
import math

import numpy as np


def chebyshev_nodes(a, b, n):
    k = np.arange(n)
    return (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (k + 0.5) / n)


def fit(xs, target, basis, degree):
    """coefficients c (lowest degree first) minimising max-ish |sum c_k basis^k / target - 1|"""
    V = np.vander(basis, degree + 1, increasing=True)
    return np.linalg.lstsq(V / target[:, None], np.ones_like(target), rcond=None)[0]


def main():
    x = chebyshev_nodes(0.0, 1.0, 600)
    p = fit(x, np.array([math.erf(v) / v for v in x]), x * x, 6)
    x = chebyshev_nodes(1.0, 4.0, 600)
    r = fit(x, np.array([math.erfc(v) * math.exp(v * v) for v in x]), 1.0 / (1.0 + x), 8)

    xs = np.linspace(1e-4, 1.0, 20001)
    err_p = max(abs(v * np.polyval(p[::-1], v * v) / math.erf(v) - 1) for v in xs)
    xs = np.linspace(1.0, 4.0, 20001)
    err_r = max(abs(np.polyval(r[::-1], 1 / (1 + v)) / (math.erfc(v) * math.exp(v * v)) - 1) for v in xs)
    print("P (erf(x)/x in x^2), highest first:", ", ".join(f"{c:.9e}" for c in p[::-1]))
    print(f"  P - 1 has constant term {p[0] - 1:.9e}; worst relative error of the fit {err_p:.2e}")
    print("R (erfc(x)exp(x^2) in 1/(1+x)), highest first:", ", ".join(f"{c:.9e}" for c in r[::-1]))
    print(f"  worst relative error of the fit {err_r:.2e}")


if __name__ == "__main__":
    main()
