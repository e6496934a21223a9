//! Passwords and tokens: argon2id hashing on blocking threads (a bounded number at once), 256-bit
//! random tokens that are stored only as their SHA-256, the lookup that turns a bearer token
//! into a user, and the throttle that locks out failed logins by (username, address), by
//! address, and by username from addresses the user has not logged in from.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chatoy_protocol::Timestamp;
use chatoy_store::{DynStore, Session, StoreResult};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::limit::Tracked;
use crate::GatewayError;

/// Hashing parameters and token lifetime.
pub(crate) struct Accounts {
    params: Params,
    token_ttl: Duration,
    /// A hash verified when the username does not exist, so that both paths cost the same.
    dummy_hash: String,
    /// One permit per hash that may be computed at once: each holds about the argon2 memory.
    hashes: tokio::sync::Semaphore,
    /// How long a hash waits for a permit before the request is answered 503.
    hash_wait: Duration,
}

/// No hash could start within the wait: the server is busy hashing (503 with `Retry-After`).
#[derive(Debug)]
pub(crate) struct Busy;

/// A freshly issued token: the string for the client and the hash for the store.
pub(crate) struct IssuedToken {
    pub(crate) token: String,
    pub(crate) hash: [u8; 32],
}

impl Accounts {
    pub(crate) fn new(
        memory_kib: u32,
        iterations: u32,
        token_ttl: Duration,
        concurrent_hashes: usize,
        hash_wait: Duration,
    ) -> Result<Accounts, GatewayError> {
        let params = Params::new(memory_kib, iterations, 1, None).map_err(GatewayError::Argon2Params)?;
        let mut accounts = Accounts {
            params,
            token_ttl,
            dummy_hash: String::new(),
            hashes: tokio::sync::Semaphore::new(concurrent_hashes.max(1)),
            hash_wait,
        };
        accounts.dummy_hash =
            hash_with(accounts.params.clone(), "not a real password").map_err(GatewayError::DummyHash)?;
        Ok(accounts)
    }

    /// A permit to compute one hash, waiting at most `hash_wait`.
    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Busy> {
        match tokio::time::timeout(self.hash_wait, self.hashes.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Busy),
        }
    }

    /// Hashes a new password with argon2id, off the async runtime.
    pub(crate) async fn hash_password(&self, password: String) -> Result<Result<String, HashError>, Busy> {
        let _permit = self.permit().await?;
        let params = self.params.clone();
        Ok(tokio::task::spawn_blocking(move || hash_with(params, &password))
            .await
            .map_err(HashError::Task)
            .and_then(|hashed| hashed.map_err(HashError::Hash)))
    }

    /// Checks a password against a stored hash (or the dummy hash when `hash` is `None`).
    pub(crate) async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Busy> {
        let _permit = self.permit().await?;
        let real = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            // The parameters come from the stored hash, so changing them never locks anyone out.
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .await
        .unwrap_or(false);
        Ok(real && checked)
    }

    /// A new 256-bit random token, as 64 hex characters, and its hash.
    pub(crate) fn issue_token() -> IssuedToken {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let hash = token_hash(&token);
        IssuedToken { token, hash }
    }

    /// The session for a new login.
    pub(crate) fn new_session(&self, user_id: u64) -> Session {
        let ttl = i64::try_from(self.token_ttl.as_nanos()).unwrap_or(i64::MAX);
        Session {
            user_id,
            expires: Timestamp(Timestamp::now().0.saturating_add(ttl)),
        }
    }

    /// The session a token stands for, with the token's hash, if it is known and unexpired.
    pub(crate) async fn authenticate(
        &self,
        store: &DynStore,
        token: &str,
    ) -> StoreResult<Option<(Session, [u8; 32])>> {
        let hash = token_hash(token);
        let session = store.session(&hash, Timestamp::now()).await?;
        Ok(session.map(|session| (session, hash)))
    }
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HashError {
    /// argon2 refused (a salt or parameter problem).
    #[error("argon2 failed: {0}")]
    Hash(argon2::password_hash::Error),
    /// The blocking task that hashed panicked or was cancelled.
    #[error("the hashing task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

fn hash_with(params: Params, password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
}

/// Most usernames, and separately client addresses, whose failed logins are remembered: an
/// attacker cycling through names or addresses cannot grow the throttle past this. When a map is
/// full even after forgetting expired entries, new keys go untracked (the other key, and the
/// argon2id cost of every attempt, still hold).
const MAX_TRACKED: usize = 100_000;

/// Failed logins, counted three ways. Failures of a key count until `lockout` passes without a
/// new one; once a key reaches its limit, logins it covers are refused, without checking the
/// password, until `lockout` after its last failure. Refused attempts do not count, so a lockout
/// always ends.
/// - by (username, address): a guesser locks only its own address out of that username;
/// - by address: one address guessing many usernames;
/// - by username over all addresses (a backstop against a guesser with many addresses, with a
///   much higher limit): it does not apply to addresses the user logged in from successfully
///   within the last [`KNOWN_FOR`], so it cannot lock the real user out from a usual address.
pub(crate) struct LoginThrottle {
    per_pair: u32,
    per_addr: u32,
    per_user_all: u32,
    lockout: Duration,
    pairs: Mutex<Failures<(String, IpAddr)>>,
    addrs: Mutex<Failures<IpAddr>>,
    users: Mutex<Failures<String>>,
    /// Per username, the addresses of its recent successful logins.
    known: Mutex<Tracked<String, Vec<(IpAddr, Instant)>>>,
}

/// How long an address a user logged in from stays exempt from the per-username backstop.
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most addresses remembered per username.
const KNOWN_PER_USER: usize = 16;

/// One map of failure counts: per key, the failures and when the last one was.
struct Failures<K>(Tracked<K, (u32, Instant)>);

impl<K: Hash + Eq> Failures<K> {
    fn new() -> Failures<K> {
        Failures(Tracked::new(MAX_TRACKED))
    }

    /// How long `key` stays locked, if it is.
    fn locked(&self, key: &K, limit: u32, lockout: Duration, now: Instant) -> Option<Duration> {
        let &(count, last) = self.0.get(key)?;
        let since = now.saturating_duration_since(last);
        (limit > 0 && count >= limit && since < lockout).then(|| lockout - since)
    }

    fn fail(&mut self, key: K, lockout: Duration, now: Instant) {
        // Failures older than the lockout no longer count: such an entry is at rest.
        self.0
            .prune(now, lockout.min(Duration::from_secs(60)), |(_, last)| {
                now.saturating_duration_since(*last) >= lockout
            });
        if let Some((count, last)) = self.0.entry(key, || (0, now)) {
            if now.saturating_duration_since(*last) >= lockout {
                *count = 0;
            }
            *count = count.saturating_add(1);
            *last = now;
        }
    }

    /// Takes one failure back (an attempt that turned out not to be one).
    fn take_back(&mut self, key: &K) {
        if let Some((count, _)) = self.0.get_mut(key) {
            *count = count.saturating_sub(1);
        }
    }
}

impl LoginThrottle {
    /// A throttle allowing `per_pair` failures per (username, address), `per_addr` per address
    /// and `per_user_all` per username from unknown addresses (0: no limit).
    pub(crate) fn new(per_pair: u32, per_addr: u32, per_user_all: u32, lockout: Duration) -> LoginThrottle {
        LoginThrottle {
            per_pair,
            per_addr,
            per_user_all,
            lockout,
            pairs: Mutex::new(Failures::new()),
            addrs: Mutex::new(Failures::new()),
            users: Mutex::new(Failures::new()),
            known: Mutex::new(Tracked::new(MAX_TRACKED)),
        }
    }

    /// Counts a login attempt before its password is checked, or `Err(retry_after)` if it is
    /// locked out. Counting first means concurrent guesses cannot slip past a limit while their
    /// hashes are computed; [`LoginThrottle::succeeded`] takes a successful attempt back.
    pub(crate) fn attempt(&self, username: &str, addr: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let name = user_key(username);
        // Always in this order, so the locks are never taken in another one.
        let mut addrs = self.addrs.lock();
        let mut pairs = self.pairs.lock();
        let mut users = self.users.lock();
        let by_addr = addrs.locked(&addr, self.per_addr, self.lockout, now);
        let by_pair = name
            .as_ref()
            .and_then(|name| pairs.locked(&(name.clone(), addr), self.per_pair, self.lockout, now));
        let by_user = name
            .as_ref()
            .filter(|name| !self.is_known(name, addr, now))
            .and_then(|name| users.locked(name, self.per_user_all, self.lockout, now));
        if let Some(wait) = by_addr.max(by_pair).max(by_user) {
            return Err(wait);
        }
        if self.per_addr > 0 {
            addrs.fail(addr, self.lockout, now);
        }
        if let Some(name) = name {
            if self.per_pair > 0 {
                pairs.fail((name.clone(), addr), self.lockout, now);
            }
            if self.per_user_all > 0 {
                users.fail(name, self.lockout, now);
            }
        }
        Ok(())
    }

    fn is_known(&self, name: &str, addr: IpAddr, now: Instant) -> bool {
        self.known.lock().get(name).is_some_and(|addrs| {
            addrs
                .iter()
                .any(|(known, at)| *known == addr && now.saturating_duration_since(*at) < KNOWN_FOR)
        })
    }

    /// Takes back an attempt that was neither a success nor a failure (the store could not be
    /// asked, or no hash could be computed).
    pub(crate) fn cancel(&self, username: &str, addr: IpAddr) {
        self.addrs.lock().take_back(&addr);
        if let Some(name) = user_key(username) {
            self.pairs.lock().take_back(&(name.clone(), addr));
            self.users.lock().take_back(&name);
        }
    }

    /// Takes back the attempt of a successful login: the (username, address) failures are
    /// cleared, the address's and the username's counts lose this attempt only (an attacker's
    /// own account must not reset them), and the address becomes known for the username.
    pub(crate) fn succeeded(&self, username: &str, addr: IpAddr) {
        self.addrs.lock().take_back(&addr);
        let Some(name) = user_key(username) else { return };
        self.pairs.lock().0.remove(&(name.clone(), addr));
        self.users.lock().take_back(&name);
        let now = Instant::now();
        let mut known = self.known.lock();
        known.prune(now, Duration::from_secs(3600), |addrs| {
            addrs.retain(|(_, at)| now.saturating_duration_since(*at) < KNOWN_FOR);
            addrs.is_empty()
        });
        let Some(addrs) = known.entry(name, Vec::new) else {
            return;
        };
        addrs.retain(|(known, at)| *known != addr && now.saturating_duration_since(*at) < KNOWN_FOR);
        addrs.push((addr, now));
        if addrs.len() > KNOWN_PER_USER {
            addrs.remove(0);
        }
    }
}

/// The throttle's key for a username: lower case, as usernames are unique without regard to
/// case; `None` for a string that cannot be a username (no account to protect, and no
/// unbounded key to store).
fn user_key(username: &str) -> Option<String> {
    chatoy_protocol::validate::username(username)
        .ok()
        .map(|()| username.to_ascii_lowercase())
}

/// The SHA-256 of a token; the only form in which tokens are stored or compared.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The first eight bytes of a token hash: how sockets remember their session for revocation.
pub(crate) fn session_key(hash: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_tokens_are_random() {
        let accounts = Accounts::new(1024, 1, Duration::from_secs(60), 2, Duration::from_secs(5)).unwrap();
        let hash = accounts
            .hash_password("correct horse".into())
            .await
            .unwrap()
            .unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(accounts
            .verify("correct horse".into(), Some(hash.clone()))
            .await
            .unwrap());
        assert!(!accounts.verify("wrong horse".into(), Some(hash)).await.unwrap());
        assert!(!accounts.verify("not a real password".into(), None).await.unwrap());
        let (a, b) = (Accounts::issue_token(), Accounts::issue_token());
        assert_eq!(a.token.len(), 64);
        assert_ne!(a.token, b.token);
        assert_eq!(a.hash, token_hash(&a.token));
    }

    #[tokio::test]
    async fn hashes_wait_for_a_permit_then_give_up() {
        let accounts = Accounts::new(1024, 1, Duration::from_secs(60), 1, Duration::from_millis(10)).unwrap();
        let held = accounts.permit().await.unwrap();
        assert!(accounts.hash_password("correct horse".into()).await.is_err());
        assert!(accounts.verify("correct horse".into(), None).await.is_err());
        drop(held);
        assert!(accounts.hash_password("correct horse".into()).await.is_ok());
    }

    #[test]
    fn throttle_locks_pairs_addresses_and_unknown_addresses_of_a_user() {
        let throttle = LoginThrottle::new(2, 3, 4, Duration::from_secs(60));
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let (home, attacker) = (ip("10.0.0.1"), ip("10.0.0.2"));
        // Alice logs in from home once: home becomes known for her.
        assert!(throttle.attempt("alice", home).is_ok());
        throttle.succeeded("alice", home);
        // Two failures lock (alice, attacker), case-insensitively, and only that pair.
        assert!(throttle.attempt("Alice", attacker).is_ok());
        assert!(throttle.attempt("alice", attacker).is_ok());
        let wait = throttle.attempt("ALICE", attacker).unwrap_err();
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert!(
            throttle.attempt("alice", home).is_ok(),
            "home is not locked by the attacker"
        );
        throttle.succeeded("alice", home);
        // Many addresses reach the per-username backstop, which spares known addresses.
        for n in 3..=4 {
            assert!(throttle.attempt("alice", ip(&format!("10.0.0.{n}"))).is_ok());
        }
        assert!(
            throttle.attempt("alice", ip("10.0.0.9")).is_err(),
            "the backstop holds"
        );
        assert!(
            throttle.attempt("alice", home).is_ok(),
            "but not for alice's usual address"
        );
        // An address failing on many usernames locks itself out.
        let guesser = ip("10.0.1.1");
        for name in ["bob", "carol", "dave"] {
            assert!(throttle.attempt(name, guesser).is_ok());
        }
        assert!(throttle.attempt("erin", guesser).is_err());
        // Strings that cannot be usernames count against the address only.
        let other = ip("10.0.2.1");
        assert!(throttle.attempt("not a valid name!", other).is_ok());

        let mut failures = Failures::new();
        let lockout = Duration::from_secs(10);
        let start = Instant::now();
        failures.fail("k", lockout, start);
        failures.fail("k", lockout, start + Duration::from_secs(5));
        assert!(failures
            .locked(&"k", 2, lockout, start + Duration::from_secs(14))
            .is_some());
        let after = start + Duration::from_secs(16);
        assert!(failures.locked(&"k", 2, lockout, after).is_none());
        failures.fail("k", lockout, after);
        assert!(
            failures.locked(&"k", 2, lockout, after).is_none(),
            "count restarted"
        );
    }
}
