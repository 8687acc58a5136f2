//! The arithmetic of `banger bench`: cases run in alternation (A, B, A, B, ...), so a change in
//! the host's load falls on both sides of a comparison; each comparison is the median of its
//! pairwise ratios (round i of B over round i of A), with their min and max.

use serde::Serialize;

/// Median, min and max of some figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// How many figures.
    pub n: usize,
}

/// The spread of `figures`; `None` when there are none.
pub fn spread(figures: &[f64]) -> Option<Spread> {
    let mut s: Vec<f64> = figures.iter().copied().filter(|f| f.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = match n {
        0 => return None,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    };
    Some(Spread { median, min: s[0], max: s[n - 1], n })
}

/// The spread of `numerator[i] / denominator[i]` over the rounds both have (a zero
/// denominator's round is left out).
pub fn pairwise(numerator: &[f64], denominator: &[f64]) -> Option<Spread> {
    let ratios: Vec<f64> = numerator.iter().zip(denominator).filter(|(_, d)| **d > 0.0).map(|(n, d)| n / d).collect();
    spread(&ratios)
}

/// Runs `rounds` rounds of `cases` cases, each round every case once in order (A, B, A, B,
/// ...), and returns each case's figures in round order. `step(case, round)` measures one; the
/// first error ends the run.
pub fn alternate<E>(
    rounds: u32,
    cases: usize,
    mut step: impl FnMut(usize, u32) -> Result<f64, E>,
) -> Result<Vec<Vec<f64>>, E> {
    let mut figures = vec![Vec::with_capacity(rounds as usize); cases];
    for round in 0..rounds {
        for (case, out) in figures.iter_mut().enumerate() {
            out.push(step(case, round)?);
        }
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_even_and_none() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, min: 1.0, max: 3.0, n: 3 }));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), Some(Spread { median: 2.5, min: 1.0, max: 4.0, n: 4 }));
        assert_eq!(spread(&[7.0]), Some(Spread { median: 7.0, min: 7.0, max: 7.0, n: 1 }));
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN, 1.0]), Some(Spread { median: 1.0, min: 1.0, max: 1.0, n: 1 }));
    }

    #[test]
    fn pairwise_ratios_are_per_round_not_of_medians() {
        // The medians' ratio would be 20/10 = 2; the rounds say 1, 1 and 4.
        let a = [10.0, 20.0, 5.0];
        let b = [10.0, 20.0, 20.0];
        assert_eq!(pairwise(&b, &a), Some(Spread { median: 1.0, min: 1.0, max: 4.0, n: 3 }));
        // Rounds are paired by index; extra rounds and zero denominators are left out.
        assert_eq!(pairwise(&[6.0, 9.0, 1.0], &[2.0, 0.0]), Some(Spread { median: 3.0, min: 3.0, max: 3.0, n: 1 }));
        assert_eq!(pairwise(&[1.0], &[]), None);
    }

    #[test]
    fn cases_alternate_round_by_round() {
        let mut order = Vec::new();
        let figures = alternate::<()>(3, 2, |case, round| {
            order.push((case, round));
            Ok(f64::from(round) * 10.0 + case as f64)
        })
        .expect("runs");
        assert_eq!(order, [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)], "A, B, A, B, never all of A first");
        assert_eq!(figures, [vec![0.0, 10.0, 20.0], vec![1.0, 11.0, 21.0]]);
    }

    #[test]
    fn an_error_ends_the_run() {
        let mut steps = 0;
        let result = alternate(5, 3, |case, round| {
            steps += 1;
            if (case, round) == (1, 1) {
                Err("failed")
            } else {
                Ok(1.0)
            }
        });
        assert_eq!(result, Err("failed"));
        assert_eq!(steps, 5);
    }
}
