"""Tests of cl.metrics on hand-written accuracy matrices and curves, plus a few properties."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cl.metrics import (
    average_accuracy,
    backward_transfer,
    confusion,
    forgetting,
    forgetting_per_task,
    forward_transfer,
    learning_accuracy,
    macro_f1_per_task,
    min_accuracy,
    stability_gap,
    summarize,
    worst_case_accuracy,
)

nan = float("nan")

R3 = np.array([[0.9, 0.1, 0.0],
               [0.6, 0.8, 0.1],
               [0.5, 0.7, 0.9]])

R2 = np.array([[0.8, 0.3],
               [0.6, 0.9]])


def test_average_accuracy():
    # last row: (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3 = 0.7
    assert average_accuracy(R3) == pytest.approx(0.7)
    # (0.6 + 0.9) / 2 = 0.75
    assert average_accuracy(R2) == pytest.approx(0.75)


def test_backward_transfer():
    # ((R[2,0] - R[0,0]) + (R[2,1] - R[1,1])) / 2 = ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = -0.25
    assert backward_transfer(R3) == pytest.approx(-0.25)
    # (0.6 - 0.8) / 1 = -0.2
    assert backward_transfer(R2) == pytest.approx(-0.2)


def test_forward_transfer():
    # ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.1 - 0.1) + (0.1 - 0.1)) / 2 = 0
    assert forward_transfer(R3, [0.1, 0.1, 0.1]) == pytest.approx(0.0)
    # ((0.1 - 0.05) + (0.1 - 0.05)) / 2 = 0.05
    assert forward_transfer(R3, np.array([0.1, 0.05, 0.05])) == pytest.approx(0.05)
    # (R[0,1] - b1) / 1 = 0.3 - 0.5 = -0.2
    assert forward_transfer(R2, [0.5, 0.5]) == pytest.approx(-0.2)


def test_forgetting_max_at_diagonal():
    # f0 = max(0.9, 0.6) - 0.5 = 0.4 ; f1 = max(0.1, 0.8) - 0.7 = 0.1 ; mean = 0.25
    np.testing.assert_allclose(forgetting_per_task(R3), [0.4, 0.1])
    assert forgetting(R3) == pytest.approx(0.25)
    # f0 = 0.8 - 0.6 = 0.2
    assert forgetting(R2) == pytest.approx(0.2)


def test_forgetting_max_at_an_earlier_row_than_the_diagonal():
    # Task 1 scores 0.9 at row 0, before it is trained (e.g. a domain stream), 0.4 after it.
    R = np.array([[0.5, 0.9, 0.2],
                  [0.6, 0.4, 0.3],
                  [0.5, 0.3, 0.8]])
    # f0 = max(0.5, 0.6) - 0.5 = 0.1 ; f1 = max(0.9, 0.4) - 0.3 = 0.6 (not 0.4 - 0.3 = 0.1)
    np.testing.assert_allclose(forgetting_per_task(R), [0.1, 0.6])
    assert forgetting(R) == pytest.approx(0.35)
    # BWT only looks at the diagonal: ((0.5 - 0.5) + (0.3 - 0.4)) / 2 = -0.05
    assert backward_transfer(R) == pytest.approx(-0.05)


def test_negative_forgetting():
    # The final model is better on task 0 than any earlier one: f0 = 0.6 - 0.9 = -0.3
    R = np.array([[0.6, 0.0],
                  [0.9, 0.7]])
    np.testing.assert_allclose(forgetting_per_task(R), [-0.3])
    assert forgetting(R) == pytest.approx(-0.3)
    assert backward_transfer(R) == pytest.approx(0.3)


def test_learning_accuracy():
    # diagonal: (0.9 + 0.8 + 0.9) / 3 = 2.6 / 3
    assert learning_accuracy(R3) == pytest.approx(2.6 / 3)
    # (0.8 + 0.9) / 2 = 0.85
    assert learning_accuracy(R2) == pytest.approx(0.85)


def test_single_task_gives_none():
    R = np.array([[0.7]])
    assert average_accuracy(R) == pytest.approx(0.7)
    assert learning_accuracy(R) == pytest.approx(0.7)
    assert backward_transfer(R) is None
    assert forward_transfer(R, [0.1]) is None
    assert forgetting(R) is None
    assert forgetting_per_task(R).shape == (0,)


# A curve over 3 tasks that end at steps 10, 20, 30. Task 0 dips to 0.3 right after its end
# (the stability gap) and recovers; task 1 dips to 0.5 early in task 2. The eval at step 5
# (0.2, before task 0 ended) must be ignored.
STEPS = np.array([5, 10, 12, 15, 20, 22, 30])
CURVE = np.array([[0.2, nan, nan],
                  [0.9, 0.1, 0.0],   # end of task 0
                  [0.3, 0.4, nan],
                  [0.6, 0.7, nan],
                  [0.7, 0.8, 0.1],   # end of task 1
                  [0.25, 0.5, 0.5],
                  [0.6, 0.7, 0.9]])  # end of task 2
ENDS = np.array([10, 20, 30])


def test_min_accuracy():
    # k = 2. task 0, steps in (10, 30]: min(0.3, 0.6, 0.7, 0.25, 0.6) = 0.25
    #        task 1, steps in (20, 30]: min(0.5, 0.7) = 0.5        -> (0.25 + 0.5) / 2 = 0.375
    assert min_accuracy(STEPS, CURVE, ENDS) == pytest.approx(0.375)
    # k = 1 on the same curve: task 0, steps in (10, 20]: min(0.3, 0.6, 0.7) = 0.3
    assert min_accuracy(STEPS, CURVE, ENDS[:2]) == pytest.approx(0.3)
    assert min_accuracy(STEPS, CURVE, ENDS[:1]) is None


def test_worst_case_accuracy():
    # k = 2: a_2 = 0.9 at step 30 -> 0.9 / 3 + (2/3) * 0.375 = 0.3 + 0.25 = 0.55
    assert worst_case_accuracy(STEPS, CURVE, ENDS) == pytest.approx(0.55)
    # k = 1: a_1 = 0.8 at step 20 -> 0.8 / 2 + (1/2) * 0.3 = 0.4 + 0.15 = 0.55
    assert worst_case_accuracy(STEPS, CURVE, ENDS[:2]) == pytest.approx(0.55)
    # k = 0: a_0 = 0.9 at step 10
    assert worst_case_accuracy(STEPS, CURVE, ENDS[:1]) == pytest.approx(0.9)


def test_stability_gap():
    # task 0: a_0 = 0.9, steps in (10, 20]: min(0.3, 0.6, 0.7) = 0.3 -> 0.6
    # task 1: a_1 = 0.8, steps in (20, 30]: min(0.5, 0.7) = 0.5      -> 0.3
    np.testing.assert_allclose(stability_gap(STEPS, CURVE, ENDS), [0.6, 0.3])
    assert stability_gap(STEPS, CURVE, ENDS[:1]).shape == (0,)


def test_stability_gap_is_zero_when_accuracy_never_falls():
    steps = np.array([10, 15, 20])
    curve = np.array([[0.5, nan], [0.6, 0.3], [0.7, 0.8]])
    np.testing.assert_allclose(stability_gap(steps, curve, [10, 20]), [0.0])


def test_macro_f1_per_task():
    # task 0, classes {0, 1}: class 0 P=1/1 R=1/2 F1=2/3; class 1 P=2/3 R=1 F1=0.8
    #   -> (2/3 + 0.8) / 2
    # task 1, classes {2, 3}: class 2 F1=1; class 3 never predicted (0 is outside the task)
    #   F1=0 -> 0.5
    scores = macro_f1_per_task([np.array([0, 0, 1, 1]), np.array([2, 3])],
                               [np.array([0, 1, 1, 1]), np.array([2, 0])],
                               [[0, 1], (2, 3)])
    assert scores == pytest.approx([(2 / 3 + 0.8) / 2, 0.5])
    assert all(type(s) is float for s in scores)
    with pytest.raises(ValueError, match="one entry per task"):
        macro_f1_per_task([np.array([0])], [], [[0]])


def test_confusion():
    matrix = confusion(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), 4)
    np.testing.assert_array_equal(matrix, [[1, 0, 0, 0],
                                           [0, 0, 1, 0],
                                           [0, 1, 1, 0],
                                           [0, 0, 0, 0]])


labelled = st.integers(1, 40).flatmap(lambda rows: st.tuples(
    st.lists(st.integers(0, 6), min_size=rows, max_size=rows),
    st.lists(st.integers(0, 6), min_size=rows, max_size=rows),
    st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True)))


@given(labelled)
@settings(max_examples=200, deadline=None)
def test_f1_and_confusion_equal_scikit_learns(case):
    # The run path computes them in numpy (no scikit-learn import per run); the figures must be
    # the ones a reader gets from the reference implementation.
    from sklearn.metrics import confusion_matrix, f1_score

    truth, predicted, labels = map(np.array, case)
    expected = f1_score(truth, predicted, average="macro", labels=labels, zero_division=0)
    assert macro_f1_per_task([truth], [predicted], [labels])[0] == pytest.approx(expected,
                                                                                 abs=1e-12)
    np.testing.assert_array_equal(confusion(truth, predicted, 7),
                                  confusion_matrix(truth, predicted, labels=np.arange(7)))


def test_confusion_refuses_ids_outside_the_classes():
    with pytest.raises(ValueError, match="prediction 9 is not a class id below 4"):
        confusion(np.array([0, 1]), np.array([0, 9]), 4)


def test_a_run_imports_no_scikit_learn():
    # Importing it cost every run about 1.3 s of CPU and 120 MB at its end (issue 12).
    code = ("import sys; from cl.experiment import execute, make_config; "
            "execute(make_config({'epochs': 1, 'tasks': 'split-npz', 'data': sys.argv[1]}), "
            "sys.argv[2]); print('sklearn' in sys.modules)")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        np.savez(f"{folder}/d.npz", x_train=rng.random((40, 4, 4)), y_train=np.arange(40) % 4,
                 x_test=rng.random((20, 4, 4)), y_test=np.arange(20) % 4)
        result = subprocess.run([sys.executable, "-c", code, f"{folder}/d.npz",
                                 f"{folder}/run"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


KEYS = {"acc", "bwt", "fwt", "forgetting", "forgetting_per_task", "learning_accuracy",
        "min_acc", "wc_acc"}


def test_summarize():
    R = CURVE[[1, 4, 6]]  # the curve at the three task end steps
    summary = summarize(R, [0.1, 0.1, 0.1], STEPS, CURVE, ENDS)
    assert set(summary) == KEYS
    json.dumps(summary)  # plain Python values only
    # last row (0.6 + 0.7 + 0.9) / 3 ; BWT ((0.6 - 0.9) + (0.7 - 0.8)) / 2 = -0.2
    assert summary["acc"] == pytest.approx(2.2 / 3)
    assert summary["bwt"] == pytest.approx(-0.2)
    # FWT ((0.1 - 0.1) + (0.1 - 0.1)) / 2 = 0 ; f0 = 0.9 - 0.6, f1 = 0.8 - 0.7
    assert summary["fwt"] == pytest.approx(0.0)
    assert summary["forgetting_per_task"] == pytest.approx([0.3, 0.1])
    assert summary["forgetting"] == pytest.approx(0.2)
    assert summary["learning_accuracy"] == pytest.approx(2.6 / 3)
    assert summary["min_acc"] == pytest.approx(0.375)
    assert summary["wc_acc"] == pytest.approx(0.55)


def test_summarize_joint_run():
    # One training phase, three tasks evaluated: only ACC = (0.8 + 0.6 + 0.7) / 3 = 0.7
    R = np.array([[0.8, 0.6, 0.7]])
    summary = summarize(R, [0.1, 0.1, 0.1], np.array([50]), R, np.array([50]))
    assert set(summary) == KEYS
    json.dumps(summary)
    assert summary["acc"] == pytest.approx(0.7)
    assert average_accuracy(R) == pytest.approx(0.7)
    assert summary["forgetting_per_task"] == []
    for key in KEYS - {"acc", "forgetting_per_task"}:
        assert summary[key] is None, key


def test_summarize_single_task():
    summary = summarize([[0.7]], [0.1], [5, 10], [[0.4], [0.7]], [10])
    assert summary["acc"] == pytest.approx(0.7)
    assert summary["learning_accuracy"] == pytest.approx(0.7)
    assert summary["bwt"] is None and summary["fwt"] is None and summary["forgetting"] is None
    assert summary["min_acc"] is None
    assert summary["wc_acc"] == pytest.approx(0.7)


@pytest.mark.parametrize("bad", [np.array([0.5, 0.5]), np.zeros((2, 3)), np.zeros((2, 2, 2)),
                                 np.zeros((0, 0))])
def test_bad_matrix_shapes_raise(bad):
    with pytest.raises(ValueError, match="R must be"):
        backward_transfer(bad)
    with pytest.raises(ValueError, match="R must be"):
        forgetting(bad)


def test_bad_shapes_raise_in_summarize():
    with pytest.raises(ValueError, match="square"):
        summarize(np.zeros((2, 3)), np.zeros(3), STEPS, CURVE, ENDS)
    with pytest.raises(ValueError, match="initial"):
        summarize(np.zeros((3, 3)), np.zeros(2), STEPS, CURVE, ENDS)
    with pytest.raises(ValueError, match="initial"):
        forward_transfer(R3, np.zeros((3, 1)))
    with pytest.raises(ValueError, match="cover"):
        summarize(np.zeros((2, 2)), np.zeros(2), STEPS, CURVE, ENDS[:2])
    with pytest.raises(ValueError, match="accuracy must have shape"):
        min_accuracy(STEPS, CURVE[:-1], ENDS)
    with pytest.raises(ValueError, match="non-decreasing"):
        min_accuracy(STEPS[::-1], CURVE, ENDS)


def test_import_is_light():
    code = "import sys, cl.metrics; assert not {'torch', 'sklearn'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def square_matrices(min_size: int = 1):
    return st.integers(min_size, 5).flatmap(
        lambda t: arrays(np.float64, (t, t), elements=st.floats(0, 1)))


@settings(max_examples=60, deadline=None)
@given(square_matrices())
def test_acc_and_bwt_are_bounded(R):
    assert 0 <= average_accuracy(R) <= 1
    bwt = backward_transfer(R)
    if R.shape[0] > 1:
        assert -1 <= bwt <= 1


@settings(max_examples=60, deadline=None)
@given(square_matrices(min_size=2))
def test_forgetting_is_at_least_minus_bwt(R):
    # The max in f_j runs over l = 0..T-2, which includes l = j, so f_j >= R[j,j] - R[T-1,j];
    # averaging over j < T-1 gives forgetting >= -BWT.
    assert forgetting(R) >= -backward_transfer(R) - 1e-12
    assert forgetting(R) == pytest.approx(float(np.mean(forgetting_per_task(R))))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.floats(0, 1))
def test_constant_matrix_has_no_forgetting(T, value):
    R = np.full((T, T), value)
    assert backward_transfer(R) == 0
    assert forgetting(R) == 0


# Runs that do not evaluate every task after every task (eval_on=seen / final): NaN in R, in
# `initial` and in the curve means "not evaluated", and a metric that needs such an entry is None.

def masked_seen(R: np.ndarray) -> np.ndarray:
    """R as a run that evaluates only the tasks seen so far records it."""
    seen = np.array(R, dtype=float)
    seen[np.triu_indices(len(seen), k=1)] = nan
    return seen


def masked_final(R: np.ndarray) -> np.ndarray:
    """R as a run that evaluates only after the last task records it."""
    final = np.array(R, dtype=float)
    final[:-1] = nan
    return final


def curves(R: np.ndarray, seed: int = 0):
    """The curves of the three evaluation modes over R: task ends at 10, 20, ..., a periodic
    evaluation (seen tasks only) at 3 and 7 steps into each task for "all" and "seen", none for
    "final", whose task end rows are NaN but the last."""
    T = len(R)
    rng = np.random.default_rng(seed)
    steps, rows, seen_rows = [], [], []
    for task in range(T):
        for offset in (3, 7):
            row = np.full(T, nan)
            row[: task + 1] = rng.random(task + 1)
            steps.append(10 * task + offset)
            rows.append(row)
            seen_rows.append(row)
        steps.append(10 * (task + 1))
        rows.append(R[task])
        seen_rows.append(masked_seen(R)[task])
    ends = 10 * np.arange(1, T + 1)
    return (np.array(steps), np.array(rows), np.array(seen_rows), ends, masked_final(R))


def window_min_by_hand(steps, accuracy, task, after, until):
    values = [accuracy[n, task] for n in range(len(steps))
              if after < steps[n] <= until and not np.isnan(accuracy[n, task])]
    return min(values)


FULL = np.random.default_rng(7).uniform(0.05, 0.95, (4, 4))
INITIAL = np.random.default_rng(8).uniform(0.0, 0.2, 4)


def test_seen_matrix_metrics_by_hand():
    T = len(FULL)
    R = masked_seen(FULL)
    assert np.isnan(R[0, 1]) and not np.isnan(R[1, 0])
    initial = np.full(T, nan)
    assert average_accuracy(R) == pytest.approx(sum(FULL[T - 1]) / T)
    assert backward_transfer(R) == pytest.approx(
        sum(FULL[T - 1, j] - FULL[j, j] for j in range(T - 1)) / (T - 1))
    assert learning_accuracy(R) == pytest.approx(sum(FULL[j, j] for j in range(T)) / T)
    # No R[j-1, j] and no initial accuracy: FWT was never measured (neither with a full
    # `initial`: the entries above the diagonal are missing too).
    assert forward_transfer(R, initial) is None
    assert forward_transfer(R, INITIAL) is None
    # f_j = max over the rows l = j..T-2 that evaluated task j, minus the last row.
    by_hand = [max(FULL[row, j] for row in range(j, T - 1)) - FULL[T - 1, j] for j in range(T - 1)]
    np.testing.assert_allclose(forgetting_per_task(R), by_hand, rtol=0, atol=1e-15)
    assert forgetting(R) == pytest.approx(sum(by_hand) / (T - 1))

    steps, full_curve, seen_curve, ends, _ = curves(FULL)
    minima = [window_min_by_hand(steps, seen_curve, i, ends[i], ends[-1]) for i in range(T - 1)]
    assert min_accuracy(steps, seen_curve, ends) == pytest.approx(sum(minima) / (T - 1))
    # min-ACC only looks at tasks already trained, which both curves evaluate alike.
    assert min_accuracy(steps, seen_curve, ends) == min_accuracy(steps, full_curve, ends)
    wc = FULL[T - 1, T - 1] / T + (1 - 1 / T) * sum(minima) / (T - 1)
    assert worst_case_accuracy(steps, seen_curve, ends) == pytest.approx(wc)
    np.testing.assert_array_equal(stability_gap(steps, seen_curve, ends),
                                  stability_gap(steps, full_curve, ends))

    summary = summarize(R, initial, steps, seen_curve, ends)
    json.dumps(summary, allow_nan=False)  # None, never NaN
    assert summary["fwt"] is None
    assert summary["acc"] == average_accuracy(R) and summary["bwt"] == backward_transfer(R)
    assert summary["forgetting_per_task"] == pytest.approx(by_hand)
    assert summary["learning_accuracy"] == learning_accuracy(R)
    assert summary["min_acc"] == pytest.approx(sum(minima) / (T - 1))
    assert summary["wc_acc"] == pytest.approx(wc)


def test_seen_masking_changes_forgetting_where_the_max_was_before_training():
    # Task 1 scores 0.9 at row 0 before it is trained (test above with all tasks evaluated:
    # f1 = 0.6); evaluated only once seen, its best earlier value is R[1, 1] = 0.4.
    R = masked_seen([[0.5, 0.9, 0.2],
                     [0.6, 0.4, 0.3],
                     [0.5, 0.3, 0.8]])
    # f0 = max(0.5, 0.6) - 0.5 = 0.1 ; f1 = 0.4 - 0.3 = 0.1
    np.testing.assert_allclose(forgetting_per_task(R), [0.1, 0.1])
    assert forgetting(R) == pytest.approx(0.1)
    assert backward_transfer(R) == pytest.approx(-0.05)


def test_final_matrix_metrics_by_hand():
    T = len(FULL)
    R = masked_final(FULL)
    initial = np.full(T, nan)
    assert average_accuracy(R) == pytest.approx(sum(FULL[T - 1]) / T)
    for value in (backward_transfer(R), forward_transfer(R, initial),
                  forward_transfer(R, INITIAL), forgetting(R), learning_accuracy(R)):
        assert value is None
    assert forgetting_per_task(R).shape == (T - 1,)
    assert np.isnan(forgetting_per_task(R)).all()

    steps, ends = 10 * np.arange(1, T + 1), 10 * np.arange(1, T + 1)
    curve = R  # one row per task end, NaN but the last
    # Tasks 0..T-3 were not evaluated at the task ends between theirs and the last: no worst case.
    assert min_accuracy(steps, curve, ends) is None
    assert worst_case_accuracy(steps, curve, ends) is None
    assert np.isnan(stability_gap(steps, curve, ends)).all()
    # Up to the first task end only, the last task is task 0, evaluated there: WC-ACC = a_0.
    # (Its row is NaN here, so it is None; the full row gives a_0.)
    assert worst_case_accuracy(steps[:1], curve[:1], ends[:1]) is None
    assert worst_case_accuracy(steps[:1], FULL[:1], ends[:1]) == FULL[0, 0]

    summary = summarize(R, initial, steps, curve, ends)
    json.dumps(summary, allow_nan=False)
    assert summary["acc"] == pytest.approx(sum(FULL[T - 1]) / T)
    assert summary["forgetting_per_task"] == [None] * (T - 1)
    for key in KEYS - {"acc", "forgetting_per_task"}:
        assert summary[key] is None, key


def test_final_with_two_tasks_keeps_min_acc_over_the_one_window():
    # With two tasks the window of task 0, (10, 20], ends at the last evaluation: min-ACC is the
    # minimum over what was evaluated in it, as with every task evaluated after each task.
    R = masked_final([[0.9, 0.2], [0.6, 0.8]])
    steps, ends = np.array([10, 20]), np.array([10, 20])
    assert min_accuracy(steps, R, ends) == 0.6
    assert worst_case_accuracy(steps, R, ends) == pytest.approx(0.8 / 2 + 0.6 / 2)
    # No a_0 at step 10: no stability gap of task 0.
    assert np.isnan(stability_gap(steps, R, ends)).all()
    summary = summarize(R, [nan, nan], steps, R, ends)
    assert summary["acc"] == pytest.approx(0.7) and summary["min_acc"] == 0.6
    assert summary["bwt"] is None and summary["forgetting"] is None


def test_forgetting_averages_the_tasks_that_have_an_earlier_value():
    R = np.array([[0.9, nan, nan],
                  [nan, nan, nan],
                  [0.5, 0.7, 0.9]])
    # f0 = 0.9 - 0.5 = 0.4 ; task 1 has no earlier evaluated value
    per_task = forgetting_per_task(R)
    assert per_task[0] == pytest.approx(0.4) and np.isnan(per_task[1])
    assert forgetting(R) == pytest.approx(0.4)
    assert summarize(R, [nan] * 3, [10, 20, 30], R, [10, 20, 30])["forgetting_per_task"] == [
        pytest.approx(0.4), None]
    # A last row with a hole: ACC and every metric of that task are undefined.
    R[2, 0] = nan
    assert average_accuracy(R) is None and backward_transfer(R) is None
    assert forgetting(R) is None


def test_a_joint_run_with_an_unevaluated_task_has_no_acc():
    R = np.array([[0.8, nan, 0.7]])
    assert average_accuracy(R) is None
    assert summarize(R, [nan] * 3, [50], R, [50])["acc"] is None


@settings(max_examples=100, deadline=None)
@given(square_matrices(min_size=2))
def test_masking_the_unseen_tasks_keeps_acc_bwt_la_and_restricts_forgetting(R):
    seen = masked_seen(R)
    T = len(R)
    assert average_accuracy(seen) == average_accuracy(R)
    assert backward_transfer(seen) == backward_transfer(R)
    assert learning_accuracy(seen) == learning_accuracy(R)
    assert forward_transfer(seen, np.full(T, nan)) is None
    by_hand = np.array([max(R[row, j] for row in range(j, T - 1)) - R[T - 1, j]
                        for j in range(T - 1)])
    np.testing.assert_array_equal(forgetting_per_task(seen), by_hand)
    assert forgetting(seen) == pytest.approx(float(np.mean(by_hand)), abs=1e-12)
    # The max over fewer rows can only be smaller: F(seen) <= F(all), and still >= -BWT.
    assert forgetting(seen) <= forgetting(R) + 1e-12
    assert forgetting(seen) >= -backward_transfer(seen) - 1e-12
