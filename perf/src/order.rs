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
/// period [`cycle_len`]`(n)`. Harnesses pass the round (plus the scenario's index, so
/// consecutive scenarios of one round do not share an order).
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
