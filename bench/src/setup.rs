//! The HTTP half of a run: registering users, logging in, creating and joining rooms.
//!
//! Every run picks a random prefix for its user and room names, so runs repeat on the same
//! server without colliding.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;

const PASSWORD: &str = "chatoy-bench-password";

/// A logged-in user.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    /// The bearer token from `POST /login`.
    pub(crate) token: String,
}

/// A client of the server's HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    base: url::Url,
    /// The run's name prefix.
    pub(crate) prefix: String,
    concurrency: usize,
}

#[derive(Deserialize)]
struct Login {
    code: i64,
    msg: String,
    user: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Created {
    id: u64,
}

impl Api {
    /// A client for `base` with a fresh random prefix.
    pub(crate) fn new(base: url::Url, concurrency: usize) -> Result<Api> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(concurrency)
            .build()
            .context("building the HTTP client")?;
        let mut rng = rand::rng();
        let prefix: String = (0..6)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
            .collect();
        Ok(Api {
            client,
            base,
            prefix,
            concurrency,
        })
    }

    fn url(&self, path: &str) -> Result<url::Url> {
        self.base
            .join(path)
            .with_context(|| format!("joining {path} to the base URL"))
    }

    async fn check(response: reqwest::Response, what: &str) -> Result<reqwest::Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        bail!(
            "{what}: HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        );
    }

    /// Registers and logs in one user.
    async fn account(&self, index: u64) -> Result<Account> {
        let username = format!("bench{}u{index}", self.prefix);
        let credentials = json!({ "username": username, "password": PASSWORD });
        let response = self
            .client
            .post(self.url("/users")?)
            .json(&credentials)
            .send()
            .await
            .context("POST /users")?;
        Self::check(response, "POST /users").await?;
        let response = self
            .client
            .post(self.url("/login")?)
            .json(&credentials)
            .send()
            .await
            .context("POST /login")?;
        let login: Login = Self::check(response, "POST /login")
            .await?
            .json()
            .await
            .context("reading the login answer")?;
        match login.user {
            Some(_) if login.code == 0 && !login.msg.is_empty() => Ok(Account { token: login.msg }),
            _ => bail!("POST /login answered code {} without a user", login.code),
        }
    }

    /// Registers and logs in `count` users, `concurrency` at a time.
    pub(crate) async fn accounts(&self, count: u64) -> Result<Vec<Account>> {
        futures_util::stream::iter(0..count)
            .map(|index| self.account(index))
            .buffered(self.concurrency)
            .try_collect()
            .await
    }

    /// Creates a room as `owner` (who joins it automatically) and returns its id.
    pub(crate) async fn create_room(&self, owner: &Account, index: u64) -> Result<u64> {
        let response = self
            .client
            .post(self.url("/rooms")?)
            .bearer_auth(&owner.token)
            .json(&json!({ "name": format!("bench {} room {index}", self.prefix) }))
            .send()
            .await
            .context("POST /rooms")?;
        let created: Created = Self::check(response, "POST /rooms")
            .await?
            .json()
            .await
            .context("reading the created room")?;
        Ok(created.id)
    }

    /// Makes `member` join `room`.
    pub(crate) async fn join(&self, member: &Account, room: u64) -> Result<()> {
        let response = self
            .client
            .post(self.url(&format!("/rooms/{room}/join"))?)
            .bearer_auth(&member.token)
            .send()
            .await
            .with_context(|| format!("POST /rooms/{room}/join"))?;
        Self::check(response, "POST /rooms/{id}/join").await?;
        Ok(())
    }

    /// Creates one room per owner (in order) and returns their ids.
    pub(crate) async fn create_rooms(&self, owners: &[&Account]) -> Result<Vec<u64>> {
        futures_util::stream::iter(owners.iter().enumerate())
            .map(|(index, owner)| self.create_room(owner, index as u64))
            .buffered(self.concurrency)
            .try_collect()
            .await
    }

    /// Registers `users` users and spreads them over `rooms` rooms: users `0..rooms` create
    /// one room each, every other user joins room `user % rooms`. Returns the accounts and the
    /// rooms' ids.
    pub(crate) async fn accounts_in_rooms(&self, users: u64, rooms: u64) -> Result<(Vec<Account>, Vec<u64>)> {
        let accounts = self.accounts(users).await?;
        let owners: Vec<_> = accounts.iter().take(rooms as usize).collect();
        let room_ids = self.create_rooms(&owners).await?;
        let joins: Vec<_> = accounts
            .iter()
            .enumerate()
            .skip(rooms as usize)
            .filter_map(|(i, account)| Some((account, *room_ids.get(i.checked_rem(room_ids.len())?)?)))
            .collect();
        self.join_all(&joins).await?;
        Ok((accounts, room_ids))
    }

    /// Makes every (member, room) pair a membership.
    pub(crate) async fn join_all(&self, joins: &[(&Account, u64)]) -> Result<()> {
        futures_util::stream::iter(joins.iter())
            .map(|(member, room)| self.join(member, *room))
            .buffer_unordered(self.concurrency)
            .try_collect::<()>()
            .await
    }
}
