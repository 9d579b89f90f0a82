"""Multistep UniPC for flow matching: the reference's inference solver as an explicit state and a pure step.

Reference (nvidia-cosmos/cosmos-transfer2.5): `FlowUniPCMultistepScheduler` (predict2/models/fm_solvers_unipc.py,
Wan's port of diffusers' UniPCMultistepScheduler) as the sampler builds it: `FlowUniPCMultistepScheduler(
num_train_timesteps=1000, shift=1)` then `set_timesteps(num_steps, shift=shift)`, with its defaults
solver_order=2, solver_type="bh2", predict_x0=True, prediction_type="flow_prediction", lower_order_final=True,
final_sigmas_type="zero", no thresholding, corrector (UniC) on from the second step.

Vocabulary as in flow.py: x_t = sigma*eps + (1-sigma)*x0 and the net predicts the velocity v = eps - x0, so the data
prediction is m = x0_hat = x - sigma*v. With alpha = 1 - sigma and lambda = log(alpha) - log(sigma), step i
(sigma_i -> sigma_{i+1}, h = lambda_{i+1} - lambda_i, phi = expm1(-h), which bh2 also uses as B(h)):

  m_i     = x_i - sigma_i * v_i                       (from the sample the net saw, before any correction)
  UniC    x_i <- (sigma_i/sigma_{i-1}) x^c_{i-1} - alpha_i phi' m_{i-1} - alpha_i phi' (corr)      (i >= 1)
          corr = 0.5 (m_i - m_{i-1})                                     (order 1)
          corr = rho_0 (m_{i-2} - m_{i-1})/r' + rho_1 (m_i - m_{i-1})   (order 2, rho from a 2x2 solve)
  UniP    x_{i+1} = (sigma_{i+1}/sigma_i) x^c_i - alpha_{i+1} phi m_i [- alpha_{i+1} phi 0.5 (m_{i-1} - m_i)/r]
                                                                                      (second term: order 2)

with r = (lambda_{i-1} - lambda_i)/h. The corrector's order is the previous predictor's; the predictor's order is
min(2, N - i, 1 + i) (warm-up, then `lower_order_final`: 1, 2, ..., 2, 1). Because sigma_N = 0 the last step is
x_N = m_{N-1}. All of this is linear in (x, m_i, m_{i-1}, m_{i-2}), so every coefficient is precomputed from the
sigma grid in numpy (float64 from the reference's float32 grid) and a step is a few fused multiply-adds with
coefficients gathered by the step index: jit-able, scan-able, no host round trip, no Python-side state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# Base grid of FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1): sigma = 1 - linspace(1, 1/1000,
# 1000)[::-1] held in float32, so sigma_max = float32(0.999) = 0.9990000128746033, sigma_min = 0 (L97-108).
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
SIGMA_MIN = 0.0
SOLVER_ORDER = 2


# ----------------------------------------------------------------------------------------------------------------
# The grid (numpy, trace time)
# ----------------------------------------------------------------------------------------------------------------
def _shifted(num_steps: int, shift: float) -> np.ndarray:
    """float64 [N] shifted sigmas sigma' = shift*s/(1+(shift-1)*s), s = linspace(sigma_max, 0, N+1)[:-1]
    (set_timesteps L180-204, same operations in the same order)."""
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    shift = float(shift)
    s = np.linspace(SIGMA_MAX, SIGMA_MIN, num_steps + 1).copy()[:-1]
    return shift * s / (1 + (shift - 1) * s)


def sigmas(num_steps: int, shift: float = 5.0) -> np.ndarray:
    """float32 [N+1] solver grid: the shifted sigmas then a final 0 (final_sigmas_type "zero"), rounded to float32
    as the reference stores them; the solver works from these values."""
    return np.concatenate([_shifted(num_steps, shift), [0.0]]).astype(np.float32)


def net_timesteps(num_steps: int, shift: float = 5.0) -> np.ndarray:
    """int64 [N] timestep the net receives at each step: int64(1000*sigma') truncated, from the float64 sigma'
    (not the float32 grid, which may truncate differently): 999, 993, 987, ... for 35 steps."""
    t = (_shifted(num_steps, shift) * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    if num_steps > 1 and t[0] == t[1]:
        # The reference locates its first step by timestep value and takes the second match when it is
        # duplicated (index_for_timestep), which then runs past the grid; refuse rather than guess.
        raise ValueError(f"num_steps={num_steps}: the first two net timesteps coincide ({t[0]}); the reference "
                         "scheduler cannot run such a grid")
    return t


def predictor_orders(num_steps: int) -> np.ndarray:
    """int64 [N] UniP order of each step: min(solver_order, N - i, 1 + i) (warm-up and lower_order_final)."""
    i = np.arange(int(num_steps))
    return np.minimum(np.minimum(SOLVER_ORDER, num_steps - i), i + 1).astype(np.int64)


def coefficients(num_steps: int, shift: float = 5.0) -> dict[str, np.ndarray]:
    """The linear coefficients of every step, float64.

    "predictor" [N, 3]: x_{i+1} = P0 x^c_i + P1 m_i + P2 m_{i-1}.
    "corrector" [N, 4]: x^c_i = C0 x^c_{i-1} + C1 m_{i-1} + C2 m_i + C3 m_{i-2}; row 0 unused (no corrector at
    the first step: x^c_0 = x_0).
    """
    n = int(num_steps)
    sig = sigmas(n, shift).astype(np.float64)
    alpha = 1.0 - sig
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # lam[N] = +inf (sigma_N = 0)
    orders = predictor_orders(n)

    pred = np.zeros((n, 3))
    corr = np.zeros((n, 4))
    for i in range(n):
        # UniP, sigma_i -> sigma_{i+1}
        h = lam[i + 1] - lam[i]
        phi = np.expm1(-h)  # -1 at the last step (h = inf)
        a_t = alpha[i + 1]
        pred[i] = [sig[i + 1] / sig[i], -a_t * phi, 0.0]
        if orders[i] == 2:
            r = (lam[i - 1] - lam[i]) / h
            half_d = 0.5 / r  # rho_p = 0.5 (the reference's simplified order-2 predictor)
            pred[i, 1] += a_t * phi * half_d
            pred[i, 2] = -a_t * phi * half_d
        # UniC at step i corrects x_i (the previous predictor's output), sigma_{i-1} -> sigma_i
        if i == 0:
            continue
        h = lam[i] - lam[i - 1]
        hh = -h
        phi = np.expm1(hh)
        a_t = alpha[i]
        corr[i, :2] = [sig[i] / sig[i - 1], -a_t * phi]
        q = orders[i - 1]
        if q == 1:
            rho = np.array([0.5])
        else:
            rk = (lam[i - 2] - lam[i - 1]) / h
            # b_k = k! * h_phi_{k+1}(hh) / B(h) with h_phi_1 = expm1(hh), h_phi_{k+1} = h_phi_k/hh - 1/k!
            phi_k = phi / hh - 1.0
            b = [phi_k / phi, 0.0]
            phi_k = phi_k / hh - 0.5
            b[1] = phi_k * 2.0 / phi
            rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
            corr[i, 3] = -a_t * phi * rho[0] / rk          # m_{i-2}
            corr[i, 1] += a_t * phi * rho[0] / rk          # D1 = (m_{i-2} - m_{i-1}) / rk
        corr[i, 2] = -a_t * phi * rho[-1]                  # D1_t = m_i - m_{i-1}
        corr[i, 1] += a_t * phi * rho[-1]
    return {"predictor": pred, "corrector": corr}


# ----------------------------------------------------------------------------------------------------------------
# State and step (jax)
# ----------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class UniPCState:
    """Everything the solver carries between steps; a pytree (scan/fori_loop carry, jit argument).

    step: int32 scalar, index i of the next step. x_last: the sample the previous predictor started from (after
    its correction; the reference's `last_sample`). m_prev, m_prev2: data predictions m_{i-1}, m_{i-2} (the
    reference's `model_outputs`). The grid and coefficient tables ride along as arrays so `step` needs nothing
    else: sigmas [N+1] float32, timesteps [N] int32 (what the net receives), orders [N] int32 (UniP order),
    predictor [N, 3] / corrector [N, 4] float32 (see `coefficients`).
    """
    step: jax.Array
    x_last: jax.Array
    m_prev: jax.Array
    m_prev2: jax.Array
    sigmas: jax.Array
    timesteps: jax.Array
    orders: jax.Array
    predictor: jax.Array
    corrector: jax.Array

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def init(x_T, num_steps: int, shift: float = 5.0) -> UniPCState:
    """Solver state for `num_steps` steps from the initial sample x_T (shape and dtype only; the history buffers
    start at zero and are never read before they are written). num_steps and shift are Python numbers."""
    coef = coefficients(num_steps, shift)
    zeros = jnp.zeros(jnp.shape(x_T), jnp.float32)
    return UniPCState(
        step=jnp.zeros((), jnp.int32), x_last=zeros, m_prev=zeros, m_prev2=zeros,
        sigmas=jnp.asarray(sigmas(num_steps, shift)),
        timesteps=jnp.asarray(net_timesteps(num_steps, shift).astype(np.int32)),
        orders=jnp.asarray(predictor_orders(num_steps).astype(np.int32)),
        predictor=jnp.asarray(coef["predictor"], jnp.float32),
        corrector=jnp.asarray(coef["corrector"], jnp.float32))


def current_timestep(state: UniPCState) -> jax.Array:
    """int32 scalar: the timestep the net receives at the next step."""
    return state.timesteps[state.step]


def step(state: UniPCState, velocity, x) -> tuple[jax.Array, UniPCState]:
    """One UniPC step (the reference's scheduler.step(velocity, t, x)): corrector on x (from the second step),
    then the predictor. velocity: the (guided) velocity the net gave at x. Returns (x_next, new state); float32.
    Stepping past the last step is undefined (indices clamp), as the reference errors there."""
    i = state.step
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(velocity, jnp.float32)
    m = x - state.sigmas[i] * v  # data prediction from the uncorrected sample (convert_model_output)

    c = state.corrector[i]
    x_corrected = c[0] * state.x_last + c[1] * state.m_prev + c[2] * m + c[3] * state.m_prev2
    x_c = jnp.where(i > 0, x_corrected, x)

    p = state.predictor[i]
    x_next = p[0] * x_c + p[1] * m + p[2] * state.m_prev
    return x_next, state.replace(step=i + 1, x_last=x_c, m_prev=m, m_prev2=state.m_prev)
