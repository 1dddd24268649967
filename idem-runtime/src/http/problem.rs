//! The `application/problem+json` responses of the layers.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::problem_type::BODY_INVALID;

/// An error response in the `application/problem+json` format of RFC 9457.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: String,
    #[serde(serialize_with = "status_code")]
    status: StatusCode,
    detail: String,
    #[serde(skip)]
    retry_after: Option<Duration>,
}

fn status_code<S: serde::Serializer>(
    status: &StatusCode,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u16(status.as_u16())
}

impl Problem {
    /// A problem with a status, a short title and a detail saying what to do, of the type
    /// `about:blank` (the status says it all) until [`with_type`](Self::with_type).
    pub fn new(status: StatusCode, title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank",
            title: title.into(),
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// A request body the handler cannot take (`400`, `415` or `422` as the rejection says),
    /// of the type [`BODY_INVALID`], which tells it from a key reused with another request
    /// ([`KEY_REUSED`](super::problem_type::KEY_REUSED), also `422`).
    ///
    /// ```
    /// use axum::http::StatusCode;
    /// use idem_runtime::http::{Problem, problem_type};
    ///
    /// let problem = Problem::body_invalid(StatusCode::UNPROCESSABLE_ENTITY, "missing field `amount`");
    /// assert_eq!(problem.kind(), problem_type::BODY_INVALID);
    /// ```
    pub fn body_invalid(status: StatusCode, detail: impl Into<String>) -> Self {
        Self::new(status, "Request body invalid", detail).with_type(BODY_INVALID)
    }

    /// Sets the problem type: a URI naming what happened, such as the constants of
    /// [`problem_type`](super::problem_type).
    #[must_use]
    pub fn with_type(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// Adds a `Retry-After` header (whole seconds, rounded up, at least 1).
    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem type.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `Retry-After`, if any.
    pub fn retry_after_value(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.title,
            self.detail
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // A struct of strings and a number always serializes; the status stays if not.
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let seconds = after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::problem_type::*;

    #[test]
    fn types_are_anchors_of_this_page() {
        for kind in [KEY_MISSING, OUTCOME_UNKNOWN, BODY_INVALID, KEY_REUSED] {
            assert!(kind.starts_with(BASE), "{kind}");
        }
        assert_ne!(BODY_INVALID, KEY_REUSED);
    }

    #[test]
    fn the_body_has_the_members_of_rfc_9457() {
        let problem = Problem::new(StatusCode::CONFLICT, "Busy", "retry")
            .with_type(IN_PROGRESS)
            .retry_after(Duration::from_millis(1200));
        let json = serde_json::to_value(&problem).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"type": IN_PROGRESS, "title": "Busy", "status": 409, "detail": "retry"})
        );
        let response = problem.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
