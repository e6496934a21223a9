//! Passwords and tokens: argon2id hashing on blocking threads, 256-bit random tokens that are
//! stored only as their SHA-256, the lookup that turns a bearer token into a user, and the
//! throttle that locks a username or a client address out after repeated failed logins.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chatoy_protocol::Timestamp;
use chatoy_store::{DynStore, Session, StoreResult};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// Hashing parameters and token lifetime.
pub(crate) struct Accounts {
    params: Params,
    token_ttl: Duration,
    /// A hash verified when the username does not exist, so that both paths cost the same.
    dummy_hash: String,
}

/// A freshly issued token: the string for the client and the hash for the store.
pub(crate) struct IssuedToken {
    pub(crate) token: String,
    pub(crate) hash: [u8; 32],
}

impl Accounts {
    pub(crate) fn new(memory_kib: u32, iterations: u32, token_ttl: Duration) -> Result<Accounts, String> {
        let params = Params::new(memory_kib, iterations, 1, None)
            .map_err(|err| format!("invalid argon2 parameters: {err}"))?;
        let mut accounts = Accounts {
            params,
            token_ttl,
            dummy_hash: String::new(),
        };
        accounts.dummy_hash = hash_with(accounts.params.clone(), "not a real password")?;
        Ok(accounts)
    }

    /// Hashes a new password with argon2id, off the async runtime.
    pub(crate) async fn hash_password(&self, password: String) -> Result<String, String> {
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || hash_with(params, &password))
            .await
            .map_err(|err| err.to_string())?
    }

    /// Checks a password against a stored hash (or the dummy hash when `hash` is `None`).
    pub(crate) async fn verify(&self, password: String, hash: Option<String>) -> bool {
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
        real && checked
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

    /// The user a token stands for, with the token's hash, if it is known and unexpired.
    pub(crate) async fn authenticate(
        &self,
        store: &DynStore,
        token: &str,
    ) -> StoreResult<Option<(u64, [u8; 32])>> {
        let hash = token_hash(token);
        let session = store.session(&hash, Timestamp::now()).await?;
        Ok(session.map(|session| (session.user_id, hash)))
    }
}

fn hash_with(params: Params, password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|err| err.to_string())?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| err.to_string())
}

/// Most usernames, and separately client addresses, whose failed logins are remembered: an
/// attacker cycling through names or addresses cannot grow the throttle past this. When a map is
/// full even after forgetting expired entries, new keys go untracked (the other key, and the
/// argon2id cost of every attempt, still hold).
const MAX_TRACKED: usize = 100_000;

/// Failed logins per username and per client address. Failures of a key count until
/// `lockout` passes without a new one; once `limit` is reached, every login of that key is
/// refused, without checking the password, until `lockout` after its last failure. Refused
/// attempts do not count, so a lockout always ends.
pub(crate) struct LoginThrottle {
    per_user: u32,
    per_addr: u32,
    lockout: Duration,
    users: Mutex<Failures<String>>,
    addrs: Mutex<Failures<IpAddr>>,
}

/// One map of failure counts.
struct Failures<K> {
    entries: HashMap<K, (u32, Instant)>,
    /// When entries older than the lockout were last dropped.
    pruned: Instant,
}

impl<K: Hash + Eq> Failures<K> {
    fn new() -> Failures<K> {
        Failures {
            entries: HashMap::new(),
            pruned: Instant::now(),
        }
    }

    /// How long `key` stays locked, if it is.
    fn locked(&self, key: &K, limit: u32, lockout: Duration, now: Instant) -> Option<Duration> {
        let &(count, last) = self.entries.get(key)?;
        let since = now.saturating_duration_since(last);
        (limit > 0 && count >= limit && since < lockout).then(|| lockout - since)
    }

    fn fail(&mut self, key: K, lockout: Duration, now: Instant) {
        // When the map is full, prune at most once a second, not on every failure.
        let every = if self.entries.len() >= MAX_TRACKED {
            Duration::from_secs(1)
        } else {
            lockout.min(Duration::from_secs(60))
        };
        if now.saturating_duration_since(self.pruned) >= every {
            self.entries
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < lockout);
            self.pruned = now;
        }
        let full = self.entries.len() >= MAX_TRACKED;
        match self.entries.get_mut(&key) {
            Some((count, last)) => {
                if now.saturating_duration_since(*last) >= lockout {
                    *count = 0;
                }
                *count = count.saturating_add(1);
                *last = now;
            }
            None if !full => {
                self.entries.insert(key, (1, now));
            }
            None => {}
        }
    }
}

impl LoginThrottle {
    /// A throttle allowing `per_user` failures per username and `per_addr` per client address
    /// (0: no limit).
    pub(crate) fn new(per_user: u32, per_addr: u32, lockout: Duration) -> LoginThrottle {
        LoginThrottle {
            per_user,
            per_addr,
            lockout,
            users: Mutex::new(Failures::new()),
            addrs: Mutex::new(Failures::new()),
        }
    }

    /// Counts a login attempt before its password is checked, or `Err(retry_after)` if logins
    /// of `username` or from `addr` are locked. Counting first means concurrent guesses cannot
    /// slip past the limit while their hashes are computed; [`LoginThrottle::succeeded`] takes a
    /// successful attempt back.
    pub(crate) fn attempt(&self, username: &str, addr: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let name = user_key(username);
        // Always addresses before usernames, so the two locks are never taken in the other order.
        let mut addrs = self.addrs.lock();
        let mut users = self.users.lock();
        let by_addr = addrs.locked(&addr, self.per_addr, self.lockout, now);
        let by_user = name
            .as_ref()
            .and_then(|name| users.locked(name, self.per_user, self.lockout, now));
        if let Some(wait) = by_addr.max(by_user) {
            return Err(wait);
        }
        if self.per_addr > 0 {
            addrs.fail(addr, self.lockout, now);
        }
        if let Some(name) = name.filter(|_| self.per_user > 0) {
            users.fail(name, self.lockout, now);
        }
        Ok(())
    }

    /// Takes back an attempt that was neither a success nor a failure (the store could not be
    /// asked).
    pub(crate) fn cancel(&self, username: &str, addr: IpAddr) {
        if let Some((count, _)) = self.addrs.lock().entries.get_mut(&addr) {
            *count = count.saturating_sub(1);
        }
        if let Some(name) = user_key(username) {
            if let Some((count, _)) = self.users.lock().entries.get_mut(&name) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Takes back the attempt of a successful login: the username's failures are cleared, the
    /// address's count loses this attempt only (an attacker's own account must not reset it).
    pub(crate) fn succeeded(&self, username: &str, addr: IpAddr) {
        if let Some((count, _)) = self.addrs.lock().entries.get_mut(&addr) {
            *count = count.saturating_sub(1);
        }
        if let Some(name) = user_key(username) {
            self.users.lock().entries.remove(&name);
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
        let accounts = Accounts::new(1024, 1, Duration::from_secs(60)).unwrap();
        let hash = accounts.hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(accounts.verify("correct horse".into(), Some(hash.clone())).await);
        assert!(!accounts.verify("wrong horse".into(), Some(hash)).await);
        assert!(!accounts.verify("not a real password".into(), None).await);
        let (a, b) = (Accounts::issue_token(), Accounts::issue_token());
        assert_eq!(a.token.len(), 64);
        assert_ne!(a.token, b.token);
        assert_eq!(a.hash, token_hash(&a.token));
    }

    #[test]
    fn throttle_locks_after_the_limit_and_forgets() {
        let throttle = LoginThrottle::new(2, 3, Duration::from_secs(60));
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let (here, there) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(throttle.attempt("Alice", here).is_ok());
        assert!(throttle.attempt("alice", there).is_ok());
        let wait = throttle.attempt("ALICE", ip("10.0.0.3")).unwrap_err();
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        // A refused attempt did not count against 10.0.0.3.
        assert!(throttle.attempt("bob", here).is_ok());
        throttle.succeeded("bob", here);
        assert!(throttle.attempt("not a valid name!", here).is_ok());
        assert!(throttle.attempt("carol", here).is_ok());
        assert!(
            throttle.attempt("dave", here).is_err(),
            "three failures from here"
        );
        assert!(throttle.attempt("dave", there).is_ok());

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
