//! Passwords and tokens: argon2id hashing on blocking threads, 256-bit random tokens that are
//! stored only as their SHA-256, and the lookup that turns a bearer token into a user.

use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chatoy_protocol::Timestamp;
use chatoy_store::{DynStore, Session, StoreResult};
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
}
