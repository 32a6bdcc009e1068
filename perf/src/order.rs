//! The order in which a harness runs its targets (or modes, or variants) within a round.
//!
//! A cyclic rotation (`0 1 2`, `1 2 0`, `2 0 1`) moves every target through every position,
//! but each target always follows the same one, so whatever a run leaves behind (a hot or
//! evicted cache, busy sockets, a throttled CPU) always lands on the same successor. The
//! orders here form a Williams design: over [`cycle_len`]`(n)` consecutive rows every target
//! takes every position equally often *and* immediately follows every other target equally
//! often (once per cycle for an even `n`, twice for an odd `n`, whose cycle adds the mirror
//! image of each row).

/// Rows of a full cycle for `n` items: `n` when `n` is even, `2n` when it is odd.
pub fn cycle_len(n: usize) -> usize {
    if n.is_multiple_of(2) {
        n.max(1)
    } else {
        2 * n
    }
}

/// The run order of `n` items (a permutation of `0..n`) for row `row`; rows repeat with
/// period [`cycle_len`]`(n)`. Harnesses pass the round; with several scenarios per round,
/// use [`scenario_order`].
pub fn run_order(n: usize, row: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    // First row 0, 1, n−1, 2, n−2, 3, …; row i adds i (mod n) to every entry.
    let first: Vec<usize> = (0..n)
        .map(|j| {
            if j % 2 == 1 {
                j.div_ceil(2)
            } else {
                (n - j / 2) % n
            }
        })
        .collect();
    let row = row % cycle_len(n);
    let shift = row % n;
    let mut order: Vec<usize> = first.iter().map(|x| (x + shift) % n).collect();
    if row >= n {
        // Odd n: the second half of the cycle is the first half mirrored.
        order.reverse();
    }
    order
}

/// The run order of `n` items in round `round` for the `scenario`-th scenario of the round:
/// [`run_order`]`(n, round)` with every item relabelled `x → (x + scenario) mod n`, so
/// consecutive scenarios of one round do not share an order. Relabelling keeps every
/// property of the design, for every block of `n` rounds from round 0 as for every full
/// cycle. (Shifting the row instead, `run_order(n, round + scenario)`, does not: for an odd
/// `n` the window of rounds a scenario sees then starts inside the mirrored half of the
/// cycle, and with fewer than `2n` rounds some target never runs first.)
pub fn scenario_order(n: usize, round: usize, scenario: usize) -> Vec<usize> {
    run_order(n, round)
        .into_iter()
        .map(|x| (x + scenario) % n)
        .collect()
}

/// A one-line warning when `rounds` is not a whole number of cycles for `n` items: every
/// block of `n` rounds from round 0 keeps the positions balanced, but who runs right after
/// whom is balanced only over whole cycles.
pub fn balance_warning(n: usize, rounds: usize, what: &str) -> Option<String> {
    let cycle = cycle_len(n);
    if n < 2 || rounds.is_multiple_of(cycle) {
        return None;
    }
    Some(format!(
        "warning: --rounds {rounds} is not a multiple of the run-order cycle ({cycle} rounds \
         for {n} {what}): {}; use --rounds {} for full balance",
        if rounds.is_multiple_of(n) {
            "positions are balanced, but who runs right after whom is not".to_string()
        } else if cycle == n {
            format!("positions and who runs right after whom are balanced only every {n} rounds")
        } else {
            format!(
                "positions are balanced only every {n} rounds, who runs right after whom \
                 every {cycle}"
            )
        },
        rounds.div_ceil(cycle) * cycle,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_permutations() {
        for n in 0..10 {
            for row in 0..3 * cycle_len(n) {
                let mut o = run_order(n, row);
                o.sort_unstable();
                assert_eq!(o, (0..n).collect::<Vec<_>>(), "n {n} row {row}");
            }
        }
    }

    #[test]
    fn balanced_positions_and_predecessors_over_a_cycle() {
        for n in 2..10 {
            let rows = cycle_len(n);
            let reps = rows / n;
            let mut position = vec![vec![0; n]; n];
            let mut follows = vec![vec![0; n]; n];
            for row in 0..rows {
                let o = run_order(n, row);
                for (p, &x) in o.iter().enumerate() {
                    position[x][p] += 1;
                }
                for w in o.windows(2) {
                    follows[w[0]][w[1]] += 1;
                }
            }
            for x in 0..n {
                assert!(
                    position[x].iter().all(|&c| c == reps),
                    "n {n}: {position:?}"
                );
                for y in 0..n {
                    let want = if x == y { 0 } else { reps };
                    assert_eq!(follows[x][y], want, "n {n}: {x} before {y}: {follows:?}");
                }
            }
        }
    }

    /// Every target in every position exactly `times` times over `rows`.
    fn position_balanced(n: usize, rows: &[Vec<usize>], times: usize) -> bool {
        let mut position = vec![vec![0; n]; n];
        for o in rows {
            for (p, &x) in o.iter().enumerate() {
                position[x][p] += 1;
            }
        }
        position.iter().all(|r| r.iter().all(|&c| c == times))
    }

    #[test]
    fn every_scenario_is_position_balanced_over_the_first_n_rounds() {
        for n in 2..=7 {
            for si in 0..3 {
                let rows: Vec<Vec<usize>> = (0..n).map(|r| scenario_order(n, r, si)).collect();
                assert!(
                    position_balanced(n, &rows, 1),
                    "n {n}, scenario {si}: {rows:?}"
                );
                // Every later block of n rounds too.
                for block in 1..4 {
                    let rows: Vec<Vec<usize>> = (block * n..(block + 1) * n)
                        .map(|r| scenario_order(n, r, si))
                        .collect();
                    assert!(
                        position_balanced(n, &rows, 1),
                        "n {n}, si {si}, block {block}"
                    );
                }
            }
        }
        // The review's case: logagg's defaults (3 targets, 3 rounds), second scenario.
        let rows: Vec<Vec<usize>> = (0..3).map(|r| scenario_order(3, r, 1)).collect();
        assert!(rows.iter().any(|o| o[0] == 0), "{rows:?}");
    }

    #[test]
    fn every_scenario_is_fully_balanced_over_a_cycle() {
        for n in 2..=7 {
            for si in 0..3 {
                let rows = cycle_len(n);
                let reps = rows / n;
                let mut follows = vec![vec![0; n]; n];
                let orders: Vec<Vec<usize>> = (0..rows).map(|r| scenario_order(n, r, si)).collect();
                for o in &orders {
                    let mut sorted = o.clone();
                    sorted.sort_unstable();
                    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                    for w in o.windows(2) {
                        follows[w[0]][w[1]] += 1;
                    }
                }
                assert!(position_balanced(n, &orders, reps), "n {n} si {si}");
                for x in 0..n {
                    for y in 0..n {
                        let want = if x == y { 0 } else { reps };
                        assert_eq!(follows[x][y], want, "n {n} si {si}: {follows:?}");
                    }
                }
            }
        }
        // Scenarios of one round differ.
        assert_ne!(scenario_order(4, 0, 0), scenario_order(4, 0, 1));
    }

    #[test]
    fn warns_unless_whole_cycles() {
        assert_eq!(balance_warning(3, 6, "targets"), None);
        assert_eq!(balance_warning(3, 12, "targets"), None);
        assert_eq!(balance_warning(4, 8, "targets"), None);
        assert_eq!(balance_warning(1, 5, "targets"), None);
        let w = balance_warning(3, 3, "targets").unwrap();
        assert_eq!(
            w,
            "warning: --rounds 3 is not a multiple of the run-order cycle (6 rounds for 3 \
             targets): positions are balanced, but who runs right after whom is not; use \
             --rounds 6 for full balance"
        );
        let w = balance_warning(4, 3, "targets").unwrap();
        assert!(
            w.contains("--rounds 4 for") && w.contains("balanced only every 4 rounds"),
            "{w}"
        );
        let w = balance_warning(3, 7, "targets").unwrap();
        assert!(
            w.contains("--rounds 12 for")
                && w.contains("only every 3 rounds, who runs right after whom every 6"),
            "{w}"
        );
        assert!(!w.contains('\n'));
    }

    #[test]
    fn consecutive_rows_differ_in_predecessors() {
        // The defect this replaces: under rotation, 1 always follows 0.
        let n = 3;
        let before_1: Vec<Option<usize>> = (0..cycle_len(n))
            .map(|row| {
                let o = run_order(n, row);
                let at = o.iter().position(|&x| x == 1).unwrap();
                at.checked_sub(1).map(|p| o[p])
            })
            .collect();
        assert!(before_1.contains(&Some(0)) && before_1.contains(&Some(2)));
        assert_eq!(run_order(1, 5), vec![0]);
        assert_eq!(run_order(2, 0), vec![0, 1]);
        assert_eq!(run_order(2, 1), vec![1, 0]);
    }
}
