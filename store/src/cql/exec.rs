//! Running prepared statements: driver errors mapped to [`StoreError`], paged reads that tolerate
//! empty pages, and lightweight-transaction results read by column name.

use std::ops::ControlFlow;

use scylla::client::session::Session;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DeserializationError, ExecutionError, IntoRowsResultError, PrepareError, RowsError};
use scylla::response::query_result::QueryResult;
use scylla::response::PagingState;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

use crate::StoreError;

/// Everything that can go wrong talking CQL; all of it means "unavailable" to callers. The
/// driver's errors are boxed to keep results small.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CqlError {
    /// The request failed (node down, timeout, overloaded, rejected).
    #[error("cql request failed: {0}")]
    Execution(Box<ExecutionError>),
    /// A statement could not be prepared (usually: the schema is missing).
    #[error("cql prepare failed: {0}")]
    Prepare(Box<PrepareError>),
    /// A statement that should return rows did not.
    #[error("unexpected cql result: {0}")]
    NotRows(Box<IntoRowsResultError>),
    /// The rows did not have the expected columns or types.
    #[error("unexpected cql rows: {0}")]
    Rows(Box<RowsError>),
    /// A value could not be decoded.
    #[error("cannot decode a cql row: {0}")]
    Decode(Box<DeserializationError>),
    /// The data read back breaks an invariant of the schema.
    #[error("inconsistent data: {0}")]
    Inconsistent(String),
}

macro_rules! boxed_from {
    ($($variant:ident: $source:ty),+ $(,)?) => {
        $(
            impl From<$source> for CqlError {
                fn from(err: $source) -> Self {
                    CqlError::$variant(Box::new(err))
                }
            }
        )+
    };
}

boxed_from!(
    Execution: ExecutionError,
    Prepare: PrepareError,
    NotRows: IntoRowsResultError,
    Rows: RowsError,
    Decode: DeserializationError,
);

impl From<CqlError> for StoreError {
    fn from(err: CqlError) -> Self {
        StoreError::Unavailable(Box::new(err))
    }
}

/// Shorthand for results inside the CQL backend.
pub(crate) type CqlResult<T> = Result<T, CqlError>;

/// Runs a statement that returns no rows worth reading (writes, DDL-free maintenance).
pub(crate) async fn write(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> CqlResult<()> {
    session.execute_unpaged(statement, values).await?;
    Ok(())
}

/// Reads every row of a statement, page by page. A page may be empty while more pages follow
/// (ScyllaDB does that): only the paging state decides when the read is over.
pub(crate) async fn read_all<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> CqlResult<Vec<R>>
where
    R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
{
    let mut rows = Vec::new();
    let mut state = PagingState::start();
    loop {
        let (result, next) = session.execute_single_page(statement, &values, state).await?;
        collect_rows(result, &mut rows)?;
        match next.into_paging_control_flow() {
            ControlFlow::Break(()) => return Ok(rows),
            ControlFlow::Continue(more) => state = more,
        }
    }
}

/// Reads the first row of a statement, if any (for lookups by full primary key).
pub(crate) async fn read_one<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> CqlResult<Option<R>>
where
    R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
{
    let result = session.execute_unpaged(statement, values).await?;
    let rows = result.into_rows_result()?;
    let mut iter = rows.rows::<R>()?;
    Ok(iter.next().transpose()?)
}

/// Appends the rows of one page to `rows`.
pub(crate) fn collect_rows<R>(result: QueryResult, rows: &mut Vec<R>) -> CqlResult<()>
where
    R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
{
    let page = result.into_rows_result()?;
    for row in page.rows::<R>()? {
        rows.push(row?);
    }
    Ok(())
}

/// The answer to a lightweight transaction (`IF NOT EXISTS`, `IF EXISTS`, `IF col = ?`).
///
/// Its shape differs between databases: Cassandra answers an applied transaction with only the
/// `[applied]` column and a refused one with `[applied]` plus the current row (or only
/// `[applied]` for batches), while ScyllaDB always sends `[applied]` plus every column, null when
/// applied. So columns are looked up by name, and a missing column is simply `None`.
#[derive(Debug)]
pub(crate) struct Lwt {
    /// Whether the condition held and the write happened.
    pub(crate) applied: bool,
    columns: Vec<(String, Option<CqlValue>)>,
}

impl Lwt {
    /// The current value of a bigint column of the row the condition was checked against.
    pub(crate) fn bigint(&self, name: &str) -> Option<i64> {
        self.columns
            .iter()
            .find(|(column, _)| column == name)
            .and_then(|(_, value)| value.as_ref())
            .and_then(CqlValue::as_bigint)
    }
}

/// Runs a lightweight transaction and reads its `[applied]` column by name.
pub(crate) async fn lwt(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> CqlResult<Lwt> {
    let result = session.execute_unpaged(statement, values).await?;
    let rows = result.into_rows_result()?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|spec| spec.name().to_owned())
        .collect();
    let row = rows
        .rows::<Row>()?
        .next()
        .transpose()?
        .ok_or_else(|| CqlError::Inconsistent("a lightweight transaction returned no row".into()))?;
    Lwt::from_columns(names.into_iter().zip(row.columns).collect())
}

impl Lwt {
    /// Reads `[applied]` from the named columns of the transaction's result row.
    fn from_columns(columns: Vec<(String, Option<CqlValue>)>) -> CqlResult<Lwt> {
        let applied = columns
            .iter()
            .find(|(name, _)| name == "[applied]")
            .and_then(|(_, value)| value.as_ref())
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| {
                CqlError::Inconsistent("a lightweight transaction returned no [applied] column".into())
            })?;
        Ok(Lwt { applied, columns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(values: &[(&str, Option<CqlValue>)]) -> Vec<(String, Option<CqlValue>)> {
        values
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect()
    }

    #[test]
    fn cassandra_shapes() {
        // Applied: only `[applied]`. Refused: `[applied]` plus the current row, or (batches)
        // only `[applied]`.
        let applied = Lwt::from_columns(columns(&[("[applied]", Some(CqlValue::Boolean(true)))])).unwrap();
        assert!(applied.applied);
        assert_eq!(applied.bigint("sent"), None);
        let refused = Lwt::from_columns(columns(&[
            ("[applied]", Some(CqlValue::Boolean(false))),
            ("room_id", Some(CqlValue::BigInt(1))),
            ("sent", Some(CqlValue::BigInt(700))),
        ]))
        .unwrap();
        assert!(!refused.applied);
        assert_eq!(refused.bigint("sent"), Some(700));
        let bare = Lwt::from_columns(columns(&[("[applied]", Some(CqlValue::Boolean(false)))])).unwrap();
        assert!(!bare.applied);
        assert_eq!(bare.bigint("sent"), None);
    }

    #[test]
    fn scylla_shapes() {
        // `[applied]` plus every column, null when applied; the order is not relied upon.
        let applied = Lwt::from_columns(columns(&[
            ("sent", None),
            ("[applied]", Some(CqlValue::Boolean(true))),
            ("sender", None),
        ]))
        .unwrap();
        assert!(applied.applied);
        assert_eq!(applied.bigint("sent"), None);
        let refused = Lwt::from_columns(columns(&[
            ("[applied]", Some(CqlValue::Boolean(false))),
            ("sent", Some(CqlValue::BigInt(5))),
            ("sender", Some(CqlValue::BigInt(9))),
        ]))
        .unwrap();
        assert_eq!((refused.applied, refused.bigint("sender")), (false, Some(9)));
    }

    #[test]
    fn no_applied_column_is_an_error() {
        assert!(Lwt::from_columns(columns(&[("sent", Some(CqlValue::BigInt(5)))])).is_err());
        assert!(Lwt::from_columns(Vec::new()).is_err());
    }
}
