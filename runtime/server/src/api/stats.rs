//! `GET /v1/metrics`: the last hour of each function, minute by minute — invocations, errors,
//! rejections and duration quantiles — from the series Kiln keeps itself
//! (`kiln_core::telemetry::series`), for the console's metrics page. `/metrics` is the Prometheus
//! view of the same counters since start-up.

use http::{Response, StatusCode};
use kiln_core::auth::Principal;
use kiln_core::function::is_valid_function_name;
use kiln_core::problem::Problem;
use kiln_core::telemetry::metrics::Metrics;
use kiln_core::telemetry::series::{MinuteStats, MINUTES};

use super::body::{self, Body};
use super::error;
use super::openapi::ErrorBody;

/// One minute, or the whole hour, of one function.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Window {
    /// Where the window starts (RFC 3339).
    start: String,
    /// Invocations that ran (succeeded, failed or timed out).
    invocations: u64,
    /// Those that failed or timed out.
    errors: u64,
    /// Refused before running (a concurrency limit): not in `invocations`.
    rejected: u64,
    /// `errors / invocations`; absent when nothing ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_rate: Option<f64>,
    /// Median duration in milliseconds, interpolated within the histogram's buckets.
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
}

impl Window {
    fn of(stats: &MinuteStats, start_minute: u64) -> Window {
        let ran = stats.ran();
        let ms = |q| stats.quantile(q).map(|s| (s * 1e6).round() / 1e3);
        Window {
            start: rfc3339(start_minute * 60),
            invocations: ran,
            errors: stats.failed + stats.timeout,
            rejected: stats.rejected,
            error_rate: (ran > 0).then(|| (stats.failed + stats.timeout) as f64 / ran as f64),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct FunctionStats {
    function: String,
    /// The whole hour.
    hour: Window,
    /// Invocations per second over the hour.
    rate_per_s: f64,
    /// The 60 minutes, oldest first, the current (partial) one last.
    minutes: Vec<Window>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct StatsList {
    /// Seconds per entry of `minutes`.
    bucket_s: u32,
    /// Functions invoked since the server started, by name (a scoped token's only).
    functions: Vec<FunctionStats>,
}

fn rfc3339(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/v1/metrics", tag = "operations",
    params(("function" = Option<String>, Query, description = "Only this function", pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length = 64)),
    responses((status = 200, description = "The last hour per function, by minute (kept in memory since the server started)", body = StatsList),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody)))]
pub fn get(metrics: &Metrics, principal: &Principal, query: Option<&str>) -> Result<Response<Body>, Problem> {
    let mut only = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("function", name)) if is_valid_function_name(name) => only = Some(name.to_owned()),
            _ => return Err(error::invalid_request(format!("unknown query parameter {pair:?}"))),
        }
    }
    let now = kiln_core::clock::now_ms() / 60_000;
    let visible = |name: &str| principal.may_invoke(name) && only.as_deref().is_none_or(|f| f == name);
    let functions = metrics
        .last_hour(now, visible)
        .into_iter()
        .map(|(function, minutes)| {
            let mut total = MinuteStats::default();
            minutes.iter().for_each(|m| total.add(m));
            let first = minutes.first().map_or(now, |m| m.minute);
            FunctionStats {
                function,
                rate_per_s: total.ran() as f64 / (MINUTES * 60) as f64,
                hour: Window::of(&total, first),
                minutes: minutes.iter().map(|m| Window::of(m, m.minute)).collect(),
            }
        })
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &StatsList {
            bucket_s: 60,
            functions,
        },
    ))
}
