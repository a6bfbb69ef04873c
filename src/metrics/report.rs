use std::collections::BTreeMap;
use std::fmt;

use metrics_util::debugging::{DebugValue, Snapshot};

use super::names;

/// A per-operation summary of the retry metrics in a `metrics-util` debugging snapshot.
///
/// Every metric of [`names`] that has an `operation` label contributes to the row of
/// that operation, and metrics without one (`idempotency_requests_total`) are ignored.
/// [`Display`](fmt::Display) prints one line per operation, sorted by operation name:
///
/// ```text
/// operation  requests  attempts  success %  retries needed %  avg ms  p99 ms  top failure reasons                   suppressed
/// accounts          1         1      100.0               0.0     5.0     5.0  -                                     -
/// checkout          4        10       75.0              50.0   468.8  1000.0  server_error×3, timeout×2, connect×1  not_idempotent×2, max_attempts×1
/// ```
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use metrics_util::debugging::DebuggingRecorder;
/// use tower_safe_retry::RetryReport;
///
/// let recorder = DebuggingRecorder::new();
/// let snapshotter = recorder.snapshotter();
/// let _guard = metrics::set_default_local_recorder(&recorder);
/// // ... send requests through a `RetryMetricsLayer` ...
/// # metrics::counter!(
/// #     "retry_requests_total",
/// #     "operation" => "api", "method" => "GET", "outcome" => "success",
/// # ).increment(1);
///
/// let report = RetryReport::from_snapshot(snapshotter.snapshot());
/// assert_eq!(report.operation("api").unwrap().requests, 1);
/// println!("{report}");
/// # }
/// ```
///
/// Taking a snapshot resets the recorder's counters and histograms, so a report covers
/// what was recorded since the previous snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryReport {
    rows: Vec<OperationReport>,
}

/// The numbers of one operation in a [`RetryReport`].
///
/// Rates and durations are `None` when no value was recorded to compute them from.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct OperationReport {
    /// The `operation` label.
    pub operation: String,
    /// Logical requests: the sum of `retry_requests_total`.
    pub requests: u64,
    /// Logical requests with outcome `success`.
    pub successes: u64,
    /// Attempts: the sum of `retry_attempts_total`.
    pub attempts: u64,
    /// Logical requests that took more than one attempt, from `retry_request_attempts`.
    pub retried_requests: u64,
    /// `successes` as a percentage of `requests`.
    pub success_rate: Option<f64>,
    /// `retried_requests` as a percentage of the values in `retry_request_attempts`.
    pub retries_needed: Option<f64>,
    /// The mean of `retry_request_duration_seconds` over every outcome, in milliseconds.
    pub mean_duration_ms: Option<f64>,
    /// The nearest-rank 99th percentile of `retry_request_duration_seconds` over every
    /// outcome, in milliseconds: the smallest recorded value that at least 99% of the
    /// values are less than or equal to.
    pub p99_duration_ms: Option<f64>,
    /// Attempts with outcome `retry` or `fail`, counted per reason, by count from the
    /// highest, then by reason. [`Display`](fmt::Display) prints the first three.
    pub failure_reasons: Vec<(String, u64)>,
    /// Retries the retry layer declined (`retry_suppressed_total`), counted per reason,
    /// by count from the highest, then by reason.
    pub suppressed: Vec<(String, u64)>,
}

impl RetryReport {
    /// Builds the report from every metric in `snapshot`.
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let mut operations: BTreeMap<String, Totals> = BTreeMap::new();
        for (key, _unit, _description, value) in snapshot.into_vec() {
            let key = key.key();
            let mut operation = None;
            let mut outcome = None;
            let mut reason = None;
            for label in key.labels() {
                match label.key() {
                    "operation" => operation = Some(label.value()),
                    "outcome" => outcome = Some(label.value()),
                    "reason" => reason = Some(label.value()),
                    _ => {}
                }
            }
            let Some(operation) = operation else {
                continue;
            };

            let totals = operations.entry(operation.to_owned()).or_default();
            totals.add(key.name(), outcome, reason, &value);
        }

        let rows = operations
            .into_iter()
            .map(|(operation, totals)| totals.into_report(operation))
            .collect();
        RetryReport { rows }
    }

    /// Returns one row per operation, sorted by operation name.
    pub fn rows(&self) -> &[OperationReport] {
        &self.rows
    }

    /// Returns the row of `operation`, or `None` when the snapshot has no metric for it.
    pub fn operation(&self, operation: &str) -> Option<&OperationReport> {
        self.rows.iter().find(|row| row.operation == operation)
    }
}

/// The values of one operation, collected from the snapshot before the rates are computed.
#[derive(Default)]
struct Totals {
    requests: u64,
    successes: u64,
    attempts: u64,
    attempts_per_request: Vec<f64>,
    durations: Vec<f64>,
    failure_reasons: BTreeMap<String, u64>,
    suppressed: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, name: &str, outcome: Option<&str>, reason: Option<&str>, value: &DebugValue) {
        match (name, value) {
            (names::REQUESTS_TOTAL, DebugValue::Counter(count)) => {
                self.requests += count;
                if outcome == Some("success") {
                    self.successes += count;
                }
            }
            (names::ATTEMPTS_TOTAL, DebugValue::Counter(count)) => {
                self.attempts += count;
                if matches!(outcome, Some("retry" | "fail")) {
                    let reason = reason.unwrap_or("unknown").to_owned();
                    *self.failure_reasons.entry(reason).or_default() += count;
                }
            }
            (names::SUPPRESSED_TOTAL, DebugValue::Counter(count)) => {
                let reason = reason.unwrap_or("unknown").to_owned();
                *self.suppressed.entry(reason).or_default() += count;
            }
            (names::REQUEST_ATTEMPTS, DebugValue::Histogram(values)) => {
                let values = values.iter().map(|value| value.into_inner());
                self.attempts_per_request.extend(values);
            }
            (names::REQUEST_DURATION_SECONDS, DebugValue::Histogram(values)) => {
                self.durations
                    .extend(values.iter().map(|value| value.into_inner()));
            }
            _ => {}
        }
    }

    fn into_report(mut self, operation: String) -> OperationReport {
        let retried_requests = self
            .attempts_per_request
            .iter()
            .filter(|&&attempts| attempts > 1.0)
            .count() as u64;
        let recorded_requests = self.attempts_per_request.len() as u64;

        self.durations.sort_by(f64::total_cmp);
        let mean = (!self.durations.is_empty())
            .then(|| self.durations.iter().sum::<f64>() / self.durations.len() as f64);
        let p99 = nearest_rank(&self.durations, 99);

        OperationReport {
            operation,
            requests: self.requests,
            successes: self.successes,
            attempts: self.attempts,
            retried_requests,
            success_rate: percentage(self.successes, self.requests),
            retries_needed: percentage(retried_requests, recorded_requests),
            mean_duration_ms: mean.map(|seconds| seconds * 1000.0),
            p99_duration_ms: p99.map(|seconds| seconds * 1000.0),
            failure_reasons: by_count(self.failure_reasons),
            suppressed: by_count(self.suppressed),
        }
    }
}

/// Returns the nearest-rank `percentile` of `sorted` (ascending): the value at rank
/// `ceil(percentile / 100 * n)`, counting from 1, or `None` for no values.
fn nearest_rank(sorted: &[f64], percentile: usize) -> Option<f64> {
    let rank = (percentile * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

fn percentage(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

/// Drops zero counts and orders the rest by count from the highest, then by label.
fn by_count(counts: BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut counts: Vec<(String, u64)> =
        counts.into_iter().filter(|(_, count)| *count > 0).collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

const HEADERS: [&str; 9] = [
    "operation",
    "requests",
    "attempts",
    "success %",
    "retries needed %",
    "avg ms",
    "p99 ms",
    "top failure reasons",
    "suppressed",
];

/// Whether each column is printed left-aligned. The number columns are right-aligned.
const LEFT_ALIGNED: [bool; 9] = [true, false, false, false, false, false, false, true, true];

impl OperationReport {
    fn cells(&self) -> [String; 9] {
        let decimal =
            |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        [
            self.operation.clone(),
            self.requests.to_string(),
            self.attempts.to_string(),
            decimal(self.success_rate),
            decimal(self.retries_needed),
            decimal(self.mean_duration_ms),
            decimal(self.p99_duration_ms),
            join_counts(&self.failure_reasons[..self.failure_reasons.len().min(3)]),
            join_counts(&self.suppressed),
        ]
    }
}

/// Formats counts as `reason×count`, comma-separated, or `-` for none.
fn join_counts(counts: &[(String, u64)]) -> String {
    if counts.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{reason}×{count}"))
        .collect();
    parts.join(", ")
}

impl fmt::Display for RetryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = HEADERS.map(str::to_owned);
        let rows: Vec<[String; 9]> = self.rows.iter().map(OperationReport::cells).collect();

        let mut widths = HEADERS.map(|header| header.chars().count());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }

        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column > 0 {
                    line.push_str("  ");
                }
                let width = widths[column];
                if LEFT_ALIGNED[column] {
                    line.push_str(&format!("{cell:<width$}"));
                } else {
                    line.push_str(&format!("{cell:>width$}"));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_p99() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&hundred, 99), Some(99.0));
        assert_eq!(nearest_rank(&hundred, 50), Some(50.0));
        assert_eq!(nearest_rank(&hundred, 100), Some(100.0));

        let two_hundred: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(nearest_rank(&two_hundred, 99), Some(198.0));

        // Below 100 values, the 99th percentile is the maximum.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(nearest_rank(&ten, 99), Some(10.0));
        assert_eq!(nearest_rank(&[7.0], 99), Some(7.0));
        assert_eq!(nearest_rank(&[7.0], 0), Some(7.0));
        assert_eq!(nearest_rank(&[], 99), None);
    }
}
