"""exercise.py: turn the reference code into exercises, and check a student's answer.

An exercise is one function of network.py or trpo_numpy.py. `make` writes a copy of
the project in which that function's body is replaced by `raise NotImplementedError`
(its signature and docstring stay); the student fills it in; `check` runs the tests
that judge it. `verify` proves every exercise sound: its tests pass on the reference
code, and fail both with the function blanked and with a plausible wrong version of
it (a sign flipped, a term dropped), so a test can never pass by accident.
EXERCISES.md describes each exercise with its equation and hints.

Usage:
  python exercise.py list
  python exercise.py make gae                    # writes exercise-gae/, a copy with gae() blanked
  python exercise.py check gae --from exercise-gae
  python exercise.py verify                      # every exercise: reference passes, blank and wrong fail
"""

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_FILES = ["network.py", "parallel.py", "run_files.py", "trpo_numpy.py", "cli.py", "test_trpo.py",
                 "requirements.txt"]


@dataclass
class Exercise:
    name: str
    file: str  # where the function lives
    function: str  # its name, "Class.method" for a method
    tests: list  # the tests in test_trpo.py that judge it
    wrong: str  # a plausible wrong body (without signature and docstring), to prove the tests catch it
    summary: str


EXERCISES = [
    Exercise("log_softmax", "network.py", "log_softmax",
             ["test_categorical_helpers_match_definitions"],
             """
             return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # no max shift: exp overflows
             """, "log-probabilities of a categorical from logits, without overflow"),
    Exercise("mlp_backward", "network.py", "MLP.backward",
             ["test_backward_matches_finite_differences", "test_backward_is_the_transpose_of_jvp"],
             """
             layers = self.unflatten(theta)
             grads = [None] * len(layers)
             delta = grad_y
             for l in reversed(range(len(layers))):
                 W, _ = layers[l]
                 h_in = cache[l]
                 grads[l] = (h_in.T @ delta, delta.sum(axis=0))
                 if l > 0:
                     delta = delta @ W.T  # forgets tanh' = 1 - h^2
             return self.flatten(grads)
             """, "backpropagation through the tanh MLP (vector-Jacobian product)"),
    Exercise("mlp_jvp", "network.py", "MLP.jvp",
             ["test_jvp_matches_finite_differences", "test_backward_is_the_transpose_of_jvp"],
             """
             layers = self.unflatten(theta)
             tangents = self.unflatten(v)
             for l, ((W, _), (dW, db)) in enumerate(zip(layers, tangents)):
                 da = cache[l] @ dW + db  # forgets the tangent flowing in from the layer below
                 if l == len(layers) - 1:
                     return da
             """, "forward-mode Jacobian-vector product through the MLP"),
    Exercise("kl", "network.py", "kl",
             ["test_categorical_helpers_match_definitions", "test_kl_of_a_policy_with_itself_is_zero",
              "test_kl_direction_is_old_to_new"],
             """
             logp_new = log_softmax(z_new)
             return (np.exp(logp_new) * (logp_new - log_softmax(z_old))).sum(axis=-1)  # KL(new || old)
             """, "KL divergence between two categoricals, in the paper's direction"),
    Exercise("categorical_fisher_product", "network.py", "categorical_fisher_product",
             ["test_categorical_fisher_is_the_hessian_of_kl_in_logit_space",
              "test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
             """
             return p * u  # diag(p) only: drops - p p^T
             """, "the Fisher information of a categorical in logit space, times a vector"),
    Exercise("fisher_vector_product", "trpo_numpy.py", "fisher_vector_product",
             ["test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian"],
             """
             u = net.jvp(theta, cache, v)
             w = categorical_fisher_product(probs, u)
             return net.backward(theta, cache, w) + damping * v  # forgets the mean's 1/N
             """, "(F + lambda I) v from a JVP, the logit-space Fisher and a backward pass"),
    Exercise("conjugate_gradient", "trpo_numpy.py", "conjugate_gradient",
             ["test_conjugate_gradient_matches_linear_solve",
              "test_conjugate_gradient_stops_on_a_non_positive_curvature"],
             """
             x = np.zeros_like(b)
             r = b.copy()
             p = r.copy()
             for _ in range(iters):
                 Ap = matrix_vector_product(p)
                 alpha = (r @ r) / (p @ p)  # the step of plain gradient descent, not CG's r.r / p.Ap
                 x += alpha * p
                 r -= alpha * Ap
                 p = r.copy()
             return x
             """, "solve F x = g with only F-vector products"),
    Exercise("surrogate", "trpo_numpy.py", "surrogate",
             ["test_surrogate_gradient_matches_finite_differences",
              "test_trpo_step_stays_in_the_trust_region_and_improves"],
             """
             N = len(actions)
             ratio = np.exp(log_prob(logits, actions) - logp_old)
             grad = -softmax(logits)
             grad[np.arange(N), actions] += 1.0
             grad *= (advantages / N)[:, None]  # forgets the ratio: right only at theta_old
             return np.mean(ratio * advantages), grad
             """, "the single-path surrogate of Eq. (14) and its gradient in the logits"),
    Exercise("maximal_step", "trpo_numpy.py", "maximal_step",
             ["test_maximal_step_puts_the_quadratic_kl_model_at_delta"],
             """
             return np.sqrt(max_kl / x_F_x) * x  # forgets the 2 of the quadratic model
             """, "the step length beta = sqrt(2 delta / x^T F x)"),
    Exercise("line_search", "trpo_numpy.py", "line_search",
             ["test_line_search_never_accepts_kl_above_delta",
              "test_line_search_returns_theta_old_when_nothing_is_accepted"],
             """
             for k in range(max_backtracks):
                 theta = theta_old + backtrack_coeff ** k * full_step
                 improvement, kl_reached = evaluate(theta)
                 if kl_reached <= 1.5 * max_kl and improvement > 0:  # baselines' slack: too lenient
                     return True, theta, improvement, kl_reached, k
             return False, theta_old, 0.0, 0.0, max_backtracks
             """, "backtracking line search: KL at most delta, and the surrogate improves"),
    Exercise("gae", "trpo_numpy.py", "gae",
             ["test_gae_on_a_hand_computed_trajectory", "test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo"],
             """
             advantages = np.zeros_like(rewards)
             next_advantage = np.zeros(rewards.shape[1:])
             for t in reversed(range(len(rewards))):
                 done = terminated[t] | truncated[t]
                 delta = rewards[t] + gamma * next_values[t] * ~done - values[t]  # a time limit is no terminal
                 next_advantage = delta + gamma * lam * ~done * next_advantage
                 advantages[t] = next_advantage
             return advantages
             """, "generalized advantage estimation with terminated and truncated episodes"),
    Exercise("discounted_returns", "trpo_numpy.py", "discounted_returns",
             ["test_monte_carlo_returns_on_a_hand_computed_trajectory",
              "test_gae_matches_a_plain_loop_and_lambda_one_is_monte_carlo"],
             """
             returns = np.zeros_like(rewards)
             next_return = next_values[-1]
             for t in reversed(range(len(rewards))):
                 ended = terminated[t] | truncated[t]
                 returns[t] = rewards[t] + gamma * next_return * ~ended  # every end treated as terminal
                 next_return = returns[t]
             return returns
             """, "Monte-Carlo discounted return-to-go, bootstrapped where the episode goes on"),
    Exercise("all_actions_surrogate", "trpo_numpy.py", "all_actions_surrogate",
             ["test_all_actions_gradient_matches_finite_differences"],
             """
             p = softmax(logits)
             V = (p * Q).sum(axis=1, keepdims=True)
             return float(V.mean()), p * Q / len(Q)  # forgets the baseline V: not the gradient
             """, "the vine's all-actions surrogate of Eq. (15) and its gradient"),
    Exercise("importance_sampled_surrogate", "trpo_numpy.py", "importance_sampled_surrogate",
             ["test_importance_sampled_gradient_matches_finite_differences",
              "test_importance_sampling_estimator_matches_the_all_actions_value"],
             """
             N = len(actions)
             p = softmax(logits)
             w = np.exp(np.take_along_axis(log_softmax(logits), actions, axis=1))  # forgets 1 / q
             W = w.sum(axis=1, keepdims=True)
             L_n = (w * Q).sum(axis=1, keepdims=True) / W
             c = w / W * (Q - L_n)
             grad = np.zeros_like(logits)
             np.add.at(grad, (np.arange(N)[:, None], actions), c)
             grad -= c.sum(axis=1, keepdims=True) * p
             return float(L_n.mean()), grad / N
             """, "the vine's self-normalised importance-sampling surrogate of Eq. (16)"),
]
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}


def find_function(tree, qualified_name):
    """The FunctionDef node of `name` or `Class.name` in a module's syntax tree."""
    *classes, name = qualified_name.split(".")
    scope = tree.body
    for class_name in classes:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == class_name).body
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


def replace_body(source, qualified_name, new_body):
    """`source` with the body of one function replaced by `new_body`, keeping its signature and docstring.

    The syntax tree says where the body starts and ends; everything else in the file is
    kept to the character, comments included."""
    function = find_function(ast.parse(source), qualified_name)
    body = function.body
    has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    code = body[1:] if has_docstring else body
    lines = source.splitlines(keepends=True)
    indent = " " * code[0].col_offset
    new_lines = textwrap.indent(textwrap.dedent(new_body).strip("\n") + "\n", indent)
    return "".join(lines[:code[0].lineno - 1]) + new_lines + "".join(lines[code[-1].end_lineno:])


def blank_body(exercise):
    return f'raise NotImplementedError("exercise {exercise.name}: write this function (see EXERCISES.md)")'


def copy_project(source_dir, target_dir, exercise=None, body=None):
    """Copy the project's files; with an exercise, replace that function's body by `body`."""
    os.makedirs(target_dir, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(os.path.join(source_dir, name), os.path.join(target_dir, name))
    if exercise is not None:
        path = os.path.join(target_dir, exercise.file)
        with open(path) as f:
            source = f.read()
        with open(path, "w") as f:
            f.write(replace_body(source, exercise.function, body))


def run_tests(directory, tests):
    """Run the named tests of test_trpo.py in `directory`; returns (all passed, pytest's report)."""
    ids = [f"test_trpo.py::{name}" for name in tests]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--tb=short", "-rfE", "--no-header",
                             "-p", "no:cacheprovider", *ids], cwd=directory, capture_output=True, text=True)
    return result.returncode == 0, result.stdout + result.stderr


def command_list(args):
    for exercise in EXERCISES:
        print(f"{exercise.name:30s} {exercise.file}: {exercise.function} - {exercise.summary}")


def command_make(args):
    exercise = BY_NAME[args.name]
    target = args.into or f"exercise-{exercise.name}"
    if os.path.exists(target) and not os.path.isdir(target):
        print(f"error: '{target}' is a file, not a folder; give --into a folder.", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(target, exercise.file)) and not args.force:
        print(f"error: '{target}' holds a copy already, maybe with your work in it; check it with "
              f"'python exercise.py check {exercise.name} --from {target}', or start over with --force "
              f"(which replaces it).", file=sys.stderr)
        return 2
    copy_project(HERE, target, exercise, blank_body(exercise))
    print(f"wrote {target}/: {exercise.file} has {exercise.function} to fill in (see EXERCISES.md).\n"
          f"check it with:  python exercise.py check {exercise.name} --from {target}")


def command_check(args):
    exercise = BY_NAME[args.name]
    directory = args.source or f"exercise-{exercise.name}"
    if not os.path.isfile(os.path.join(directory, exercise.file)):
        print(f"error: no {exercise.file} in '{directory}'; make one with: python exercise.py make {args.name}",
              file=sys.stderr)
        return 2
    passed, report = run_tests(directory, exercise.tests)
    print(report.rstrip())
    print(f"\n{exercise.name}: " + ("all tests pass. Well done." if passed else
                                    "not yet: the failures above say what was expected and what came out."))
    return 0 if passed else 1


def command_verify(args):
    """For every exercise: reference passes, blanked fails, the wrong version fails."""
    unsound = 0
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference")
        copy_project(HERE, reference)
        all_tests = sorted({t for e in EXERCISES for t in e.tests})
        reference_ok, report = run_tests(reference, all_tests)
        if not reference_ok:
            print(report)
            print("the reference code fails the exercises' tests")
            return 1
        for exercise in EXERCISES:
            verdicts = []
            for label, body in (("blanked", blank_body(exercise)), ("wrong", exercise.wrong)):
                copy = os.path.join(tmp, f"{exercise.name}-{label}")
                copy_project(HERE, copy, exercise, body)
                passed, _ = run_tests(copy, exercise.tests)
                verdicts.append(f"{label} {'PASSES (unsound)' if passed else 'fails'}")
                unsound += passed
            print(f"{exercise.name:30s} reference passes, " + ", ".join(verdicts))
    if unsound:
        print(f"{unsound} unsound exercise version(s): a test passed that must fail")
        return 1
    print(f"{len(EXERCISES)} exercises verified")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the exercises")
    make = commands.add_parser("make", help="write a copy of the project with one function blanked")
    make.add_argument("name", choices=list(BY_NAME))
    make.add_argument("--into", help="folder for the copy (default exercise-NAME)")
    make.add_argument("--force", action="store_true",
                      help="replace a copy that is there already (the work in it is lost)")
    check = commands.add_parser("check", help="run an exercise's tests on a student's copy")
    check.add_argument("name", choices=list(BY_NAME))
    check.add_argument("--from", dest="source", help="the student's folder (default exercise-NAME)")
    commands.add_parser("verify", help="prove every exercise's tests pass on the reference and fail when "
                                       "the function is blanked or wrong")
    args = parser.parse_args(argv)
    return {"list": command_list, "make": command_make, "check": command_check,
            "verify": command_verify}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
