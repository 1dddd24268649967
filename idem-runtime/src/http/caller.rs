//! Who is calling: the identity that scopes keys.

use axum::http::StatusCode;
use axum::http::header::HeaderName;
use axum::http::request;

use super::Problem;
use super::problem_type::CALLER_UNKNOWN;
use crate::Error;

/// Who is calling: the identity that scopes keys, so that one caller never receives another's
/// stored response.
pub trait Caller: Send + Sync + 'static {
    /// The caller of `request`, or the problem that refuses it.
    ///
    /// # Errors
    ///
    /// The response to send instead of running the request, such as `401`.
    fn identify(&self, request: &request::Parts) -> Result<String, Problem>;
}

impl<F> Caller for F
where
    F: Fn(&request::Parts) -> Result<String, Problem> + Send + Sync + 'static,
{
    fn identify(&self, request: &request::Parts) -> Result<String, Problem> {
        self(request)
    }
}

/// The caller named by a request header, such as an API key or a tenant id set by an
/// authenticating proxy; a request without it is refused with `401`.
#[derive(Clone, Debug)]
pub struct CallerHeader {
    name: HeaderName,
}

impl CallerHeader {
    /// The caller is the value of the header `name` (any case).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] if `name` is not a header name.
    pub fn new(name: &str) -> Result<Self, Error> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| Error::InvalidName {
            what: "header name",
            name: name.to_owned(),
            reason: "it is not an HTTP header name",
        })?;
        Ok(Self { name })
    }
}

impl Caller for CallerHeader {
    fn identify(&self, request: &request::Parts) -> Result<String, Problem> {
        let missing = || {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "Caller unknown",
                format!("send the `{}` header that identifies you", self.name),
            )
            .with_type(CALLER_UNKNOWN)
        };
        let value = request.headers.get(&self.name).ok_or_else(missing)?;
        match value.to_str() {
            Ok(caller) if !caller.trim().is_empty() => Ok(caller.to_owned()),
            _ => Err(missing()),
        }
    }
}

/// Every request comes from one caller: for a service whose clients all share one key space
/// (an internal API behind a gateway that already separates tenants).
#[derive(Clone, Copy, Debug, Default)]
pub struct OneCaller;

impl Caller for OneCaller {
    fn identify(&self, _: &request::Parts) -> Result<String, Problem> {
        Ok("*".to_owned())
    }
}
