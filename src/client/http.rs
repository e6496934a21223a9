//! The HTTP API of one server: accounts, rooms and history, and the WebSocket URL next to it.

use anyhow::{bail, Context};
use chatoy_protocol::http::CodeMsg;
use chatoy_protocol::Message;
use serde::de::DeserializeOwned;

use super::NETWORK_TIMEOUT;

/// The HTTP API of one server.
pub(super) struct Http {
    base: String,
    pub(super) ws_url: String,
    client: reqwest::Client,
}

impl Http {
    pub(super) fn new(url: &str) -> anyhow::Result<Http> {
        let base = url.trim_end_matches('/').to_owned();
        let ws_url = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}/ws")
        } else if base.starts_with("https://") {
            bail!("this client speaks plain HTTP only; put TLS in a local proxy (got {base})");
        } else {
            bail!("--url must start with http:// (got {base})");
        };
        let client = reqwest::Client::builder()
            .timeout(NETWORK_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Http { base, ws_url, client })
    }

    /// One API call; a non-2xx answer becomes an error carrying the server's `msg`.
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&impl serde::Serialize>,
    ) -> anyhow::Result<T> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}: cannot reach {}", self.base))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: cannot read the answer"))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<CodeMsg>(&bytes)
                .map(|body| body.msg)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{method} {path}: {status}: {msg}");
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: unexpected answer"))
    }

    pub(super) async fn history(&self, token: &str, room: u64, limit: u16) -> anyhow::Result<Vec<Message>> {
        let path = format!("/rooms/{room}/messages?limit={limit}");
        self.call(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let http = Http::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(http.base, "http://127.0.0.1:8080");
        assert_eq!(http.ws_url, "ws://127.0.0.1:8080/ws");
        assert!(Http::new("https://chat.example.com").is_err());
        assert!(Http::new("127.0.0.1:8080").is_err());
    }
}
