//! Admitting connections: the connection-rate limits per gateway and per client address, and
//! the client address itself (the TCP peer, or the entry a trusted proxy added).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hyper::header::{HeaderMap, HeaderValue, CONNECTION, RETRY_AFTER};
use hyper::{Response, StatusCode};
use parking_lot::Mutex;

use super::{error_response, Body};
use crate::config::GatewayConfig;
use crate::limit::{Bucket, KeyedBuckets};

/// Most client addresses with a partly used bucket. Past this, new addresses go unchecked (the
/// gateway-wide bucket still holds).
const MAX_TRACKED_ADDRS: usize = 65_536;

/// One token bucket per client address (connections, registrations).
pub(crate) struct AddrBuckets(KeyedBuckets<IpAddr>);

impl AddrBuckets {
    pub(crate) fn new(rate: f64, burst: f64) -> AddrBuckets {
        AddrBuckets(KeyedBuckets::new(rate, burst, MAX_TRACKED_ADDRS))
    }

    /// Takes a token of `addr`'s bucket, or says how long until one is there.
    pub(crate) fn take(&self, addr: IpAddr) -> Result<(), Duration> {
        self.0.take(addr)
    }
}

/// The connection-rate limits: one bucket for the gateway, one per client address.
pub(crate) struct Admission {
    rate: f64,
    burst: f64,
    gateway: Mutex<Bucket>,
    addrs: AddrBuckets,
}

/// Why a connection was refused: the status to answer and how long to wait.
pub(crate) struct Refused {
    pub(super) status: StatusCode,
    pub(super) retry_after: Duration,
}

impl Admission {
    pub(crate) fn new(config: &GatewayConfig) -> Admission {
        Admission {
            rate: config.conn_rate,
            burst: config.conn_burst.max(1.0),
            gateway: Mutex::new(Bucket::full(config.conn_burst.max(1.0), Instant::now())),
            addrs: AddrBuckets::new(config.conn_rate_per_ip, config.conn_burst_per_ip),
        }
    }

    /// Counts a new connection from `addr`: 429 over the address's rate (which then does not
    /// use up the gateway's), 503 over the gateway's.
    pub(super) fn admit(&self, addr: IpAddr) -> Result<(), Refused> {
        self.addrs.take(addr).map_err(|retry_after| Refused {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after,
        })?;
        self.gateway
            .lock()
            .take(self.rate, self.burst, Instant::now())
            .map_err(|retry_after| Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                retry_after,
            })
    }
}

/// The key a client address is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64, the smallest block one host is usually given.
pub(super) fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// The client's address: the last entry of `--client-ip-header` when it is configured and
/// readable (the entry the trusted proxy added), else the TCP peer.
pub(super) fn client_addr(config: &GatewayConfig, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let forwarded = config.client_ip_header.as_deref().and_then(|name| {
        let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
        let last = value.rsplit(',').next()?.trim();
        last.parse::<IpAddr>()
            .ok()
            .or_else(|| last.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
    });
    addr_key(forwarded.unwrap_or(peer.ip()))
}

/// A refusal that asks the client to come back later and ends the connection.
pub(super) fn refused_response(
    status: StatusCode,
    msg: &str,
    retry_after: Duration,
    close: bool,
) -> Response<Body> {
    let mut response = error_response(status, msg);
    set_retry_after(&mut response, retry_after);
    if close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// `Retry-After` in whole seconds, at least 1.
pub(super) fn set_retry_after(response: &mut Response<Body>, wait: Duration) {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_count_by_ipv4_or_ipv6_slash_64() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(addr_key(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(addr_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(addr_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn client_address_from_the_last_header_entry() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut config = GatewayConfig::default();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1, 2.2.2.2"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            peer.ip(),
            "no header configured"
        );
        config.client_ip_header = Some("x-forwarded-for".into());
        assert_eq!(
            client_addr(&config, peer, &headers),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("[2001:db8::1]:443"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(
            client_addr(&config, peer, &headers),
            peer.ip(),
            "unreadable: the peer"
        );
    }

    #[test]
    fn admission_per_address_then_per_gateway() {
        let config = GatewayConfig {
            conn_rate: 0.001,
            conn_burst: 3.0,
            conn_rate_per_ip: 0.001,
            conn_burst_per_ip: 2.0,
            ..GatewayConfig::default()
        };
        let admission = Admission::new(&config);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(admission.admit(a).is_ok());
        assert!(admission.admit(a).is_ok());
        let refused = admission.admit(a).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry_after > Duration::from_secs(900));
        assert!(
            admission.admit(b).is_ok(),
            "the refusal did not use the gateway's token"
        );
        assert_eq!(
            admission.admit(b).unwrap_err().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
