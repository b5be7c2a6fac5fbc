"""network.py: the numerical building blocks of TRPO, every derivative by hand.

What is here, in the order trpo_numpy.py uses it:

* `MLP`: a tanh multilayer perceptron whose parameters are ONE flat vector
  `theta`, so that conjugate gradient and the line search work on plain 1-D
  arrays. Its three passes sit side by side:
    - `forward`  : y = f_theta(x), returning an explicit cache of activations;
    - `backward` : the vector-Jacobian product  g^T (dy/dtheta)  (backprop);
    - `jvp`      : the Jacobian-vector product  (dy/dtheta) v  (forward mode).
* Categorical distributions on logits z: `softmax`, `log_softmax`,
  `log_prob`, `entropy`, `kl`, `sample`, and `categorical_fisher_product`,
  the Fisher information of a categorical in logit space, diag(p) - p p^T,
  applied to a vector (TRPO Appendix C).
* `Categorical`: those functions as one policy distribution, the one an `MLP`
  policy's outputs (logits) parametrise.
* Diagonal Gaussian distributions on z = [mu, log sigma], for continuous
  actions: `gaussian_log_prob`, `gaussian_log_prob_grad`, `gaussian_entropy`,
  `gaussian_kl`, `gaussian_sample`, and `gaussian_fisher_product`, the Fisher
  information in (mu, log sigma), diag(1/sigma^2, 2); together
  `DiagonalGaussian`, the distribution of a `GaussianPolicy` (an MLP for the
  mean, and log sigma as the last entries of theta).
* `Adam` (Kingma & Ba 2014, arXiv:1412.6980) for the value network.
* `numerical_gradient` and `relative_error`: central finite differences, the
  reference every derivative above is tested against in test_trpo.py.

References: Schulman et al. 2015, Trust Region Policy Optimization,
arXiv:1502.05477. Everything is float64 NumPy; no autodiff framework.
"""

import itertools
import math

import numpy as np


# ----------------------------------------------------------------------------
# The tanh MLP
# ----------------------------------------------------------------------------

class MLP:
    """y = tanh(... tanh(x W_1 + b_1) ...) W_L + b_L: tanh hidden layers, a linear output.

    The object holds only the architecture (`sizes`, e.g. [8, 64, 64, 4]); the
    parameters are a separate flat vector `theta` passed to every method. Layer l
    occupies W_l (row-major, shape (n_in, n_out)) followed by b_l in theta.
    As a policy, an MLP's outputs are the logits of a categorical over sizes[-1]
    actions (`distribution`); GaussianPolicy below is the continuous one.
    """

    def __init__(self, sizes):
        if len(sizes) < 2 or any(int(n) < 1 for n in sizes):
            raise ValueError(f"an MLP needs at least two positive layer sizes, got {sizes}")
        self.sizes = [int(n) for n in sizes]
        self.shapes = list(zip(self.sizes[:-1], self.sizes[1:]))  # (n_in, n_out) per layer
        self.num_params = sum(n_in * n_out + n_out for n_in, n_out in self.shapes)

    def unflatten(self, theta):
        """Flat vector -> list of (W, b) per layer. These are views: writing into them writes theta."""
        layers, start = [], 0
        for n_in, n_out in self.shapes:
            W = theta[start:start + n_in * n_out].reshape(n_in, n_out)
            start += n_in * n_out
            b = theta[start:start + n_out]
            start += n_out
            layers.append((W, b))
        return layers

    def flatten(self, layers):
        """List of (W, b) per layer -> one flat vector (the inverse of `unflatten`)."""
        return np.concatenate([np.concatenate([W.ravel(), b]) for W, b in layers])

    def init(self, rng, output_gain=1.0):
        """Orthogonal weights, zero biases. A small `output_gain` (0.01 for the policy)
        makes every action nearly equally likely at the start, so exploration is not
        decided by the random initialisation."""
        theta = np.zeros(self.num_params)
        layers = self.unflatten(theta)
        for l, (W, _) in enumerate(layers):
            gain = output_gain if l == len(layers) - 1 else np.sqrt(2.0)
            # QR of a Gaussian matrix gives a random orthogonal basis; the sign fix makes it uniform.
            q, r = np.linalg.qr(rng.standard_normal((max(W.shape), min(W.shape))))
            q = q * np.sign(np.diag(r))
            W[:] = gain * (q if W.shape[0] >= W.shape[1] else q.T)
        return theta

    def forward(self, theta, x):
        """y = f_theta(x) for a batch x of shape (N, n_in).

        Returns (y, cache). `cache` is the list of each layer's input: cache[0] = x,
        cache[l] = h_l = tanh(h_{l-1} W_l + b_l). The backward pass and the JVP both
        reuse it, so the nonlinearity is evaluated once.
        """
        layers = self.unflatten(theta)
        cache = [x]
        h = x
        for W, b in layers[:-1]:
            h = np.tanh(h @ W + b)  # (N, n_out)
            cache.append(h)
        W, b = layers[-1]
        return h @ W + b, cache

    @staticmethod
    def tanh_slopes(cache):
        """tanh'(a_l) = 1 - h_l^2 for each hidden layer's output h_l = cache[l], l >= 1 (tanh' = 1 - tanh^2):
        what `backward` and `jvp` multiply by. They compute these themselves unless given them; a caller
        that takes many passes on one cache (trpo_step's conjugate gradient) computes them once."""
        return [1.0 - h ** 2 for h in cache[1:]]

    def backward(self, theta, cache, grad_y, slopes=None):
        """Vector-Jacobian product: sum_i grad_y_i^T (dy_i/dtheta), as a flat vector.

        With grad_y = dLoss/dy this is the ordinary gradient dLoss/dtheta (backprop):
        dW_l = h_{l-1}^T delta_l, db_l = sum_i delta_l, and delta_{l-1} = (delta_l W_l^T) * (1 - h_{l-1}^2)
        because tanh' = 1 - tanh^2. `slopes` is tanh_slopes(cache), if the caller has it.
        """
        layers = self.unflatten(theta)
        slopes = self.tanh_slopes(cache) if slopes is None else slopes
        grads = [None] * len(layers)
        delta = grad_y  # (N, n_out) of the current layer
        for l in reversed(range(len(layers))):
            W, _ = layers[l]
            h_in = cache[l]
            grads[l] = (h_in.T @ delta, delta.sum(axis=0))
            if l > 0:
                delta = (delta @ W.T) * slopes[l - 1]  # slopes[l - 1] = 1 - h_in^2
        return self.flatten(grads)

    def jvp(self, theta, cache, v, slopes=None):
        """Jacobian-vector product: (dy/dtheta) v for every sample, shape (N, n_out).

        Forward-mode differentiation: push the tangent u = dh/dtheta . v through the
        layers beside the activations. With h_l = tanh(a_l), a_l = h_{l-1} W_l + b_l:
            da_l = h_{l-1} dW_l + db_l + u_{l-1} W_l,    u_l = (1 - h_l^2) * da_l,
        and u_0 = 0 because the input does not depend on theta. `slopes` is tanh_slopes(cache),
        if the caller has it.
        """
        layers = self.unflatten(theta)
        tangents = self.unflatten(v)
        slopes = self.tanh_slopes(cache) if slopes is None else slopes
        u = None  # the tangent of the layer's input; u_0 = 0, so the first layer skips its term
        for l, ((W, _), (dW, db)) in enumerate(zip(layers, tangents)):
            da = cache[l] @ dW + db  # (N, n_out)
            if u is not None:
                da += u @ W
            if l == len(layers) - 1:
                return da  # the output layer is linear
            u = slopes[l] * da  # slopes[l] = 1 - h_{l+1}^2, at this layer's output


# ----------------------------------------------------------------------------
# Categorical distributions on logits z (one row per state)
# ----------------------------------------------------------------------------

def log_softmax(z):
    """log p = z - logsumexp(z), row by row; subtracting the max keeps exp from overflowing."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(z):
    """p = exp(z) / sum exp(z), row by row (shifted by the max, which cancels, so exp cannot overflow)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_prob(z, actions):
    """log pi(a_i | s_i) for each row i of logits z and its action a_i."""
    return log_softmax(z)[np.arange(len(actions)), actions]


def entropy(z):
    """H(pi(.|s)) = -sum_a p_a log p_a, one value per row."""
    logp = log_softmax(z)
    return -(np.exp(logp) * logp).sum(axis=-1)


def kl(z_old, z_new):
    """KL(pi_old(.|s) || pi_new(.|s)) = sum_a p_old,a (log p_old,a - log p_new,a), one value per row.

    The direction is the paper's: the old policy is the first argument, the one
    whose states and actions we sampled (TRPO Eq. 12)."""
    logp_old = log_softmax(z_old)
    return (np.exp(logp_old) * (logp_old - log_softmax(z_new))).sum(axis=-1)


def sample(z, uniforms):
    """Draw one action per row from softmax(z) by inverting the cumulative distribution.

    `uniforms` holds one number u in [0, 1) per row (e.g. rng.random(len(z))); the action is
    the number of entries of the cumulative distribution cdf below u (u scaled by the cdf's
    total): a is chosen when cdf[a-1] < u <= cdf[a], and u = 0 gives action 0. Passing the uniforms in lets every environment
    draw from its own generator, so a run does not depend on how environments are batched."""
    cdf = np.cumsum(softmax(z), axis=-1)
    u = np.asarray(uniforms)[:, None] * cdf[:, -1:]  # scale by the total so rounding never leaves u > cdf[-1]
    return (u > cdf).sum(axis=-1)


def sample_one(z, u):
    """sample's rule for one state, in plain Python: the action drawn from softmax(z), z a vector of
    logits, with the uniform u. For a few logits this takes a quarter of the time of sample's NumPy
    calls, which a vine branch, stepping one state at a time, would pay at every step. The cumulative
    sum is left unnormalised and u scaled by its total: the same action as sample, unless u times the
    total falls within a rounding of one of its entries, which differ in the last bit (about once in
    10^16 draws)."""
    logits = z.tolist()
    largest = max(logits)
    cdf = list(itertools.accumulate(math.exp(x - largest) for x in logits))
    threshold = float(u) * cdf[-1]
    return sum(c < threshold for c in cdf)


def categorical_fisher_product(p, u):
    """(diag(p) - p p^T) u, row by row: the Fisher information of a categorical in logit space.

    It is the Hessian of KL(p_old || softmax(z)) with respect to z at z = z_old
    (TRPO Appendix C), so F = J^T (diag(p) - p p^T) J for the policy network's
    Jacobian J = dz/dtheta. Cost O(N * num_actions): no matrix is built."""
    return p * u - p * (p * u).sum(axis=-1, keepdims=True)


class Categorical:
    """The policy distribution of discrete actions: pi(a|s) = softmax(z)_a, z the logits (one row per state).

    The functions above under the names every policy distribution has, so that the algorithm
    (trpo_numpy.py) works with this one and DiagonalGaussian alike. An action is an integer."""
    log_prob = staticmethod(log_prob)
    entropy = staticmethod(entropy)
    kl = staticmethod(kl)
    sample = staticmethod(sample)

    @staticmethod
    def log_prob_grad(z, actions):
        """d log pi(a_i|s_i) / dz_i = onehot(a_i) - p_i, one row per state."""
        grad = -softmax(z)
        grad[np.arange(len(actions)), actions] += 1.0
        return grad

    @staticmethod
    def entropy_grad(z):
        """dH/dz = -p * (log p + H), row by row."""
        logp = log_softmax(z)
        p = np.exp(logp)
        return -p * (logp - (p * logp).sum(axis=-1, keepdims=True))

    @staticmethod
    def fisher_product(z, u):
        """The Fisher information in logit space at z, times u, row by row: categorical_fisher_product."""
        return categorical_fisher_product(softmax(z), u)

    @staticmethod
    def noise(rng, num_actions, shape=None):
        """The random numbers `sample` needs: one uniform in [0, 1) per state (a float for one state,
        an array of `shape` for several)."""
        return rng.random(shape)

    @staticmethod
    def greedy(z):
        """The most likely action of each row."""
        return np.argmax(z, axis=-1)


MLP.distribution = Categorical


# ----------------------------------------------------------------------------
# Diagonal Gaussian distributions on z = [mu, log sigma] (one row per state), for continuous actions
# ----------------------------------------------------------------------------

def gaussian_parts(z):
    """(mu, log sigma) of z = [mu, log sigma]: the first and second half of each row."""
    d = z.shape[-1] // 2
    return z[..., :d], z[..., d:]


def gaussian_log_prob(z, actions):
    """log pi(a|s) = -sum_j [ (a_j - mu_j)^2 / (2 sigma_j^2) + log sigma_j ] - d/2 log(2 pi), one value per row."""
    mu, log_std = gaussian_parts(z)
    x = (actions - mu) / np.exp(log_std)  # the standardised action
    return -(0.5 * x ** 2 + log_std).sum(axis=-1) - 0.5 * mu.shape[-1] * np.log(2 * np.pi)


def gaussian_log_prob_grad(z, actions):
    """d log pi(a|s) / dz, z = [mu, log sigma]: [(a - mu) / sigma^2, (a - mu)^2 / sigma^2 - 1], row by row."""
    mu, log_std = gaussian_parts(z)
    sigma = np.exp(log_std)
    x = (actions - mu) / sigma
    return np.concatenate([x / sigma, x ** 2 - 1.0], axis=-1)


def gaussian_entropy(z):
    """H = sum_j log sigma_j + d/2 (1 + log(2 pi)), one value per row."""
    mu, log_std = gaussian_parts(z)
    return log_std.sum(axis=-1) + 0.5 * mu.shape[-1] * (1.0 + np.log(2 * np.pi))


def gaussian_kl(z_old, z_new):
    """KL(pi_old || pi_new) of two diagonal Gaussians, one value per row, in the paper's direction (Eq. 12):
    sum_j [ log(sigma_new / sigma_old) + (sigma_old^2 + (mu_old - mu_new)^2) / (2 sigma_new^2) - 1/2 ]."""
    mu_old, log_std_old = gaussian_parts(z_old)
    mu_new, log_std_new = gaussian_parts(z_new)
    var_new = np.exp(2 * log_std_new)
    return (log_std_new - log_std_old + (np.exp(2 * log_std_old) + (mu_old - mu_new) ** 2) / (2 * var_new)
            - 0.5).sum(axis=-1)


def gaussian_sample(z, normals):
    """a = mu + sigma * n for given standard normals n, one row per state (given, so that a run's numbers
    come from each environment's own generator)."""
    mu, log_std = gaussian_parts(z)
    return mu + np.exp(log_std) * normals


def gaussian_fisher_product(z, u):
    """The Fisher information of a diagonal Gaussian in z = [mu, log sigma], times u, row by row.

    It is the Hessian of KL(pi_z_old || pi_z) in z at z_old, the M of F = J^T M J (Appendix C.1,
    J = dz/dtheta) worked out for z = [mu, log sigma]: diagonal, 1 / sigma_j^2 for each mean and a
    constant for each log sigma_j (differentiate gaussian_kl twice to find it). No matrix is built."""
    mu_u, log_std_u = gaussian_parts(u)
    _, log_std = gaussian_parts(z)
    return np.concatenate([mu_u * np.exp(-2 * log_std), 2.0 * log_std_u], axis=-1)


class DiagonalGaussian:
    """The policy distribution of continuous actions: pi(.|s) = N(mu, diag(sigma^2)), z = [mu, log sigma].

    An action is a vector of d floats; the functions above under Categorical's names."""
    log_prob = staticmethod(gaussian_log_prob)
    log_prob_grad = staticmethod(gaussian_log_prob_grad)
    entropy = staticmethod(gaussian_entropy)
    kl = staticmethod(gaussian_kl)
    sample = staticmethod(gaussian_sample)
    fisher_product = staticmethod(gaussian_fisher_product)

    @staticmethod
    def entropy_grad(z):
        """dH/dz: 0 for each mean, 1 for each log sigma, row by row."""
        mu, log_std = gaussian_parts(z)
        return np.concatenate([np.zeros_like(mu), np.ones_like(log_std)], axis=-1)

    @staticmethod
    def noise(rng, action_dim, shape=None):
        """The random numbers `sample` needs: action_dim standard normals per state (shape (*shape, d);
        (d,) for one state)."""
        return rng.standard_normal(action_dim if shape is None else (*shape, action_dim))

    @staticmethod
    def greedy(z):
        """The mean action of each row."""
        return gaussian_parts(z)[0]


class GaussianPolicy(MLP):
    """A diagonal Gaussian policy: the tanh MLP gives the mean mu_theta(s) of the d = sizes[-1] actions,
    and log sigma, one per action and the same in every state, is the last d entries of theta
    (as in the paper's continuous policies, Appendix D: a diagonal covariance, independent of the
    state, with the log standard deviations a vector of parameters). `init` leaves log sigma at 0 (sigma = 1). The output for
    a batch is z = [mu, log sigma], (N, 2d): the distribution's parameters, as an MLP's logits are a
    categorical's.

    The Jacobian dz/dtheta is the MLP's for mu and the identity for log sigma, so forward,
    backward and jvp are the MLP's passes with the log sigma block beside them."""
    distribution = DiagonalGaussian

    def __init__(self, sizes):
        super().__init__(sizes)
        self.mean_params = self.num_params  # the MLP's part of theta
        self.num_params += self.sizes[-1]   # and log sigma after it

    def unflatten(self, theta):
        """The MLP's layers (W, b), views into theta; log sigma is theta[mean_params:]."""
        return super().unflatten(theta[:self.mean_params])

    def forward(self, theta, x):
        """z = [mu_theta(x), log sigma] for a batch x (N, n_in); the cache is the MLP's."""
        mu, cache = super().forward(theta, x)
        return np.concatenate([mu, np.broadcast_to(theta[self.mean_params:], mu.shape)], axis=1), cache

    def backward(self, theta, cache, grad_z, slopes=None):
        """sum_i grad_z_i^T (dz_i/dtheta): backprop of the mean's part, and the log sigma part summed over rows."""
        d = self.sizes[-1]
        return np.concatenate([super().backward(theta, cache, grad_z[:, :d], slopes), grad_z[:, d:].sum(axis=0)])

    def jvp(self, theta, cache, v, slopes=None):
        """(dz/dtheta) v for every row: the MLP's jvp of the mean's part, and v's log sigma part in every row."""
        mean_u = super().jvp(theta, cache, v, slopes)
        return np.concatenate([mean_u, np.broadcast_to(v[self.mean_params:], mean_u.shape)], axis=1)


def policy_network(sizes, continuous):
    """The policy for actions of sizes[-1] dimensions: a GaussianPolicy if they are continuous, else an MLP
    whose outputs are the logits of a categorical over sizes[-1] actions."""
    return GaussianPolicy(sizes) if continuous else MLP(sizes)


# ----------------------------------------------------------------------------
# Adam
# ----------------------------------------------------------------------------

class Adam:
    """Adam on a flat parameter vector (Kingma & Ba 2014, Algorithm 1)."""

    def __init__(self, num_params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = np.zeros(num_params)  # first moment of the gradient
        self.v = np.zeros(num_params)  # second moment of the gradient
        self.t = 0

    def step(self, theta, grad):
        """Return theta after one descent step on grad (it minimises)."""
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad ** 2
        # Bias correction: m and v start at zero, so early averages are too small.
        m_hat = self.m / (1 - self.beta1 ** self.t)
        v_hat = self.v / (1 - self.beta2 ** self.t)
        return theta - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# ----------------------------------------------------------------------------
# Finite differences: the reference every hand-written derivative is checked against
# ----------------------------------------------------------------------------

def numerical_gradient(f, x, eps=1e-6):
    """Central differences (f(x + eps e_i) - f(x - eps e_i)) / (2 eps) for every coordinate i.

    f maps a flat float64 vector to a scalar or an array; the result has shape
    x.shape + f(x).shape. The error is O(eps^2), about 1e-10 relative here.
    """
    x = np.array(x, dtype=np.float64)
    columns = []
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = eps
        columns.append((np.asarray(f(x + step)) - np.asarray(f(x - step))) / (2 * eps))
    return np.array(columns).reshape(x.shape + np.shape(columns[0]))


def relative_error(a, b):
    """max |a - b| / max(|a|, |b|, tiny): small means the two agree to that many digits."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    return np.abs(a - b).max(initial=0.0) / scale
