//! Browser origins: which may call the API and open WebSockets, and the CORS answers for them.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, HOST, ORIGIN, VARY,
};
use hyper::{Response, StatusCode};

use super::{ApiError, Body, Reply};
use crate::config::{AllowedOrigins, GatewayConfig};

/// Checks the `Origin` header. `Ok(Some(origin))`: a cross-origin request from an allowed origin,
/// to answer with CORS headers; `Ok(None)`: no `Origin`, or the request's own host; `Err`: 403.
pub(super) fn check_origin(config: &GatewayConfig, headers: &HeaderMap) -> Reply<Option<HeaderValue>> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or_default().trim_end_matches('/');
    let listed = match &config.allowed_origins {
        AllowedOrigins::Any => true,
        AllowedOrigins::List(list) => list.iter().any(|allowed| allowed.eq_ignore_ascii_case(text)),
        AllowedOrigins::SameOrigin => false,
    };
    if listed {
        return Ok(Some(origin.clone()));
    }
    let same_host = text.split_once("://").is_some_and(|(_, authority)| {
        headers
            .get(HOST)
            .and_then(|host| host.to_str().ok())
            .is_some_and(|host| host.eq_ignore_ascii_case(authority))
    });
    if same_host {
        return Ok(None);
    }
    Err(ApiError::new(StatusCode::FORBIDDEN, "origin not allowed"))
}

/// The CORS headers for an allowed cross-origin request.
pub(super) fn add_cors(response: &mut Response<Body>, origin: HeaderValue) {
    let h = response.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
    h.append(VARY, HeaderValue::from_static("origin"));
}

/// The answer to a CORS preflight from an allowed origin (its `Access-Control-Allow-Origin` is
/// added like on every other answer).
pub(super) fn preflight() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let h = response.headers_mut();
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_same_host_listed_or_any() {
        let mut config = GatewayConfig::default();
        let headers = |origin: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(HOST, HeaderValue::from_static("chat.example.com"));
            headers.insert(ORIGIN, HeaderValue::from_static(origin));
            headers
        };
        assert!(matches!(check_origin(&config, &HeaderMap::new()), Ok(None)));
        assert!(matches!(
            check_origin(&config, &headers("https://chat.example.com")),
            Ok(None)
        ));
        assert!(check_origin(&config, &headers("https://evil.example")).is_err());
        config.allowed_origins = AllowedOrigins::parse("https://app.example.com").unwrap();
        assert!(matches!(
            check_origin(&config, &headers("https://app.example.com")),
            Ok(Some(_))
        ));
        assert!(check_origin(&config, &headers("https://app.example.com:444")).is_err());
        config.allowed_origins = AllowedOrigins::Any;
        assert!(matches!(check_origin(&config, &headers("null")), Ok(Some(_))));
    }
}
