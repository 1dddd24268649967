//! A response as it is stored and replayed.

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::Problem;
use super::problem_type::RECORD_UNUSABLE;

/// The response header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A response as it is stored: its status, its end-to-end headers and its body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    status: u16,
    /// Names and base64 values: a value need not be text.
    headers: Vec<(String, String)>,
    /// Base64.
    body: String,
}

/// Headers that describe one connection or one message, not the response: not stored.
const UNSTORED: &[HeaderName] = &[
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::DATE,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl StoredResponse {
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Self {
        Self {
            status: status.as_u16(),
            headers: headers
                .iter()
                .filter(|(name, _)| !UNSTORED.contains(name) && name.as_str() != "keep-alive")
                .map(|(name, value)| (name.as_str().to_owned(), BASE64.encode(value.as_bytes())))
                .collect(),
            body: BASE64.encode(body),
        }
    }

    /// The response, marked `Idempotent-Replayed: true` when `replayed`; a `500` problem if the
    /// record does not decode.
    pub(crate) fn into_response(self, replayed: bool) -> Response {
        let unusable = |what: &str| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Idempotency record unusable",
                format!("the stored response's {what} does not decode"),
            )
            .with_type(RECORD_UNUSABLE)
            .into_response()
        };
        let Ok(status) = StatusCode::from_u16(self.status) else {
            return unusable("status");
        };
        let Ok(body) = BASE64.decode(self.body) else {
            return unusable("body");
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        for (name, value) in self.headers {
            let name = HeaderName::from_bytes(name.as_bytes());
            let value = BASE64
                .decode(value)
                .ok()
                .and_then(|value| HeaderValue::from_bytes(&value).ok());
            match (name, value) {
                (Ok(name), Some(value)) => {
                    response.headers_mut().append(name, value);
                }
                _ => return unusable("headers"),
            }
        }
        if replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_responses_round_trip_without_connection_headers() {
        let mut map = HeaderMap::new();
        map.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        map.insert(header::LOCATION, HeaderValue::from_static("/orders/A-1"));
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        map.insert(header::CONNECTION, HeaderValue::from_static("close"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        let stored = StoredResponse::new(
            StatusCode::CREATED,
            &map,
            &Bytes::from_static(b"{\"ok\":1}\n"),
        );
        let json = serde_json::to_string(&stored).expect("serializes");
        let back: StoredResponse = serde_json::from_str(&json).expect("deserializes");
        let response = back.into_response(true);
        assert_eq!(response.status(), StatusCode::CREATED);
        let headers = response.headers();
        assert_eq!(headers[header::LOCATION], "/orders/A-1");
        assert_eq!(headers.get_all(header::SET_COOKIE).iter().count(), 2);
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(headers[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn garbage_in_a_stored_response_is_a_500_not_a_panic() {
        let stored = StoredResponse {
            status: 99,
            headers: vec![],
            body: String::new(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let stored = StoredResponse {
            status: 200,
            headers: vec![("bad name".to_owned(), String::new())],
            body: String::new(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let stored = StoredResponse {
            status: 200,
            headers: vec![],
            body: "***".to_owned(),
        };
        assert_eq!(
            stored.into_response(false).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
