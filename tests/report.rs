//! `RetryReport` built from scripted metrics and from requests on a paused clock.
#![cfg(feature = "report")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use metrics::{counter, histogram};
use metrics_util::debugging::DebuggingRecorder;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{RetryLayer, RetryMetricsLayer, RetryPolicy, RetryReport};

fn request(operation: &'static str, method: &'static str, outcome: &'static str, seconds: f64) {
    counter!(
        "retry_requests_total",
        "operation" => operation, "method" => method, "outcome" => outcome,
    )
    .increment(1);
    histogram!(
        "retry_request_duration_seconds",
        "operation" => operation, "outcome" => outcome,
    )
    .record(seconds);
}

fn attempts(operation: &'static str, outcome: &'static str, reason: &'static str, count: u64) {
    counter!(
        "retry_attempts_total",
        "operation" => operation, "outcome" => outcome, "reason" => reason,
    )
    .increment(count);
}

/// Records `checkout`: four requests, three of them successful, that took 1, 1, 2 and 3
/// attempts, and `accounts`: one request on the first attempt.
fn record_scripted_metrics() {
    request("checkout", "GET", "success", 0.125);
    request("checkout", "GET", "success", 0.25);
    request("checkout", "GET", "success", 0.5);
    request("checkout", "POST", "failure", 1.0);
    for value in [1.0, 1.0, 2.0, 3.0] {
        histogram!("retry_request_attempts", "operation" => "checkout").record(value);
    }
    attempts("checkout", "success", "none", 3);
    attempts("checkout", "retry", "server_error", 2);
    attempts("checkout", "fail", "server_error", 1);
    attempts("checkout", "retry", "timeout", 2);
    attempts("checkout", "retry", "reset", 1);
    attempts("checkout", "retry", "connect", 1);
    counter!("retry_suppressed_total", "operation" => "checkout", "reason" => "max_attempts")
        .increment(1);
    counter!("retry_suppressed_total", "operation" => "checkout", "reason" => "not_idempotent")
        .increment(2);

    request("accounts", "GET", "success", 0.005);
    histogram!("retry_request_attempts", "operation" => "accounts").record(1.0);
    attempts("accounts", "success", "none", 1);

    // A metric without an `operation` label is not part of any row.
    counter!("idempotency_requests_total", "outcome" => "executed").increment(5);
}

#[test]
fn report_rows_from_scripted_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let report = metrics::with_local_recorder(&recorder, || {
        record_scripted_metrics();
        RetryReport::from_snapshot(snapshotter.snapshot())
    });

    let operations: Vec<&str> = report
        .rows()
        .iter()
        .map(|row| row.operation.as_str())
        .collect();
    assert_eq!(operations, ["accounts", "checkout"]);

    let checkout = report.operation("checkout").unwrap();
    assert_eq!(checkout.requests, 4);
    assert_eq!(checkout.successes, 3);
    assert_eq!(checkout.attempts, 10);
    assert_eq!(checkout.retried_requests, 2);
    assert_eq!(checkout.success_rate, Some(75.0));
    assert_eq!(checkout.retries_needed, Some(50.0));
    assert_eq!(checkout.mean_duration_ms, Some(468.75));
    assert_eq!(checkout.p99_duration_ms, Some(1000.0));
    let reasons = [
        ("server_error".to_owned(), 3),
        ("timeout".to_owned(), 2),
        ("connect".to_owned(), 1),
        ("reset".to_owned(), 1),
    ];
    assert_eq!(checkout.failure_reasons, reasons);
    let suppressed = [
        ("not_idempotent".to_owned(), 2),
        ("max_attempts".to_owned(), 1),
    ];
    assert_eq!(checkout.suppressed, suppressed);

    let accounts = report.operation("accounts").unwrap();
    assert_eq!(accounts.requests, 1);
    assert_eq!(accounts.attempts, 1);
    assert_eq!(accounts.success_rate, Some(100.0));
    assert_eq!(accounts.retries_needed, Some(0.0));
    assert_eq!(accounts.p99_duration_ms, Some(5.0));
    assert!(accounts.failure_reasons.is_empty());
    assert!(accounts.suppressed.is_empty());

    assert!(report.operation("idempotency").is_none());
}

#[test]
fn report_display_lines() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let report = metrics::with_local_recorder(&recorder, || {
        record_scripted_metrics();
        RetryReport::from_snapshot(snapshotter.snapshot())
    });

    let text = report.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("operation  requests  attempts  success %"),
        "{text}"
    );
    assert!(lines[1].starts_with("accounts"), "{text}");
    assert!(lines[2].starts_with("checkout"), "{text}");

    let checkout: Vec<&str> = lines[2]
        .split("  ")
        .filter(|cell| !cell.is_empty())
        .collect();
    let expected = [
        "checkout",
        "4",
        "10",
        "75.0",
        "50.0",
        "468.8",
        "1000.0",
        "server_error×3, timeout×2, connect×1",
        "not_idempotent×2, max_attempts×1",
    ];
    let checkout: Vec<&str> = checkout.iter().map(|cell| cell.trim()).collect();
    assert_eq!(checkout, expected, "{text}");

    let accounts: Vec<&str> = lines[1]
        .split("  ")
        .filter(|cell| !cell.is_empty())
        .collect();
    let accounts: Vec<&str> = accounts.iter().map(|cell| cell.trim()).collect();
    assert_eq!(
        accounts,
        ["accounts", "1", "1", "100.0", "0.0", "5.0", "5.0", "-", "-"]
    );
}

#[test]
fn report_p99_nearest_rank() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let report = metrics::with_local_recorder(&recorder, || {
        // 200 requests of 1 s to 200 s: rank ceil(0.99 * 200) = 198.
        for seconds in (1..=200).rev() {
            request("batch", "GET", "success", f64::from(seconds));
        }
        RetryReport::from_snapshot(snapshotter.snapshot())
    });

    let batch = report.operation("batch").unwrap();
    assert_eq!(batch.requests, 200);
    assert_eq!(batch.p99_duration_ms, Some(198_000.0));
    assert_eq!(batch.mean_duration_ms, Some(100_500.0));
    // No `retry_request_attempts` values were recorded.
    assert_eq!(batch.retries_needed, None);
}

#[test]
fn empty_report_prints_header() {
    let recorder = DebuggingRecorder::new();
    let report = RetryReport::from_snapshot(recorder.snapshotter().snapshot());

    assert!(report.rows().is_empty());
    let text = report.to_string();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("operation"), "{text}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn report_from_retried_requests() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // Each attempt takes 125 ms. The first two calls respond with 503, later ones with 200.
    let calls = Arc::new(AtomicU32::new(0));
    let flaky = service_fn(move |_request: Request<()>| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(125)).await;
            let mut response = Response::new(());
            if call < 2 {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(response)
        }
    });
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::from_millis(250)))
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("flaky"))
        .layer(RetryLayer::new(policy))
        .service(flaky);
    for _ in 0..2 {
        let request = Request::get("http://example.test/").body(()).unwrap();
        let response = stack.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    let report = RetryReport::from_snapshot(snapshotter.snapshot());
    let flaky = report.operation("flaky").unwrap();
    assert_eq!(flaky.requests, 2);
    assert_eq!(flaky.attempts, 4);
    assert_eq!(flaky.success_rate, Some(100.0));
    assert_eq!(flaky.retries_needed, Some(50.0));
    // 3 × 125 ms + 2 × 250 ms = 875 ms, then 125 ms.
    assert_eq!(flaky.mean_duration_ms, Some(500.0));
    assert_eq!(flaky.p99_duration_ms, Some(875.0));
    assert_eq!(flaky.failure_reasons, [("server_error".to_owned(), 2)]);
    assert!(flaky.suppressed.is_empty());
}
