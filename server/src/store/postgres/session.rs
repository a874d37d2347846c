//! What a transaction runs its statements on ([`Session`]): the pool's
//! blocking `postgres::Client`, or the writer's [`Pipelined`] session,
//! which sends several statements before reading any answer.
//!
//! Why pipelining: a change runs a dozen statements, most of them writes
//! whose answer is only checked (a row count, a row returned as written).
//! One round trip each, under the revision row's lock that every writer on
//! every replica queues for, made a rotation cost some 18 round trips of
//! that lock's time. Sent together, a change costs three (the statements
//! themselves are unchanged; PostgreSQL runs them one after the other, as
//! before). The blocking `postgres` crate cannot pipeline (each call waits
//! for its answer), so the writer's connection is a `tokio_postgres`
//! client driven on a runtime of its own, as the blocking crate does it.

use std::collections::HashMap;
use std::future::Future;

use postgres::types::ToSql;
use postgres::{Error, Row, Statement};

pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// How a statement's answer is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Want {
    /// Its rows.
    Rows,
    /// The number of rows it touched.
    Count,
}

/// A statement's answer.
pub(super) enum Answer {
    Rows(Vec<Row>),
    Count(u64),
}

impl Answer {
    /// Its rows (none for a count).
    pub(super) fn into_rows(self) -> Vec<Row> {
        match self {
            Answer::Rows(rows) => rows,
            Answer::Count(_) => Vec::new(),
        }
    }
}

/// The calls a transaction makes on a connection.
pub(super) trait Session {
    fn prepare(&mut self, sql: &str) -> Result<Statement, Error>;
    fn query(&mut self, st: &Statement, p: Params<'_>) -> Result<Vec<Row>, Error>;
    fn execute(&mut self, st: &Statement, p: Params<'_>) -> Result<u64, Error>;
    /// Rows one at a time: `f` sees each until it answers `Ok(false)`.
    fn each(
        &mut self,
        st: &Statement,
        p: Params<'_>,
        f: &mut dyn FnMut(&Row) -> crate::store::Result<bool>,
    ) -> crate::store::Result<()>;
    fn batch_execute(&mut self, sql: &str) -> Result<(), Error>;
    /// Runs `items` in order and returns their answers, up to and
    /// including the first that failed (PostgreSQL skips nothing: in a
    /// transaction every later statement fails too, as aborted).
    fn pipeline(&mut self, items: &[(&Statement, Want, Params<'_>)]) -> Vec<Result<Answer, Error>> {
        let mut out = Vec::with_capacity(items.len());
        for (st, want, p) in items {
            let answer = match want {
                Want::Rows => self.query(st, p).map(Answer::Rows),
                Want::Count => self.execute(st, p).map(Answer::Count),
            };
            let failed = answer.is_err();
            out.push(answer);
            if failed {
                break;
            }
        }
        out
    }
    fn is_closed(&self) -> bool;
}

impl Session for postgres::Client {
    fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        postgres::Client::prepare(self, sql)
    }

    fn query(&mut self, st: &Statement, p: Params<'_>) -> Result<Vec<Row>, Error> {
        postgres::Client::query(self, st, p)
    }

    fn execute(&mut self, st: &Statement, p: Params<'_>) -> Result<u64, Error> {
        postgres::Client::execute(self, st, p)
    }

    fn each(
        &mut self,
        st: &Statement,
        p: Params<'_>,
        f: &mut dyn FnMut(&Row) -> crate::store::Result<bool>,
    ) -> crate::store::Result<()> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut rows = self.query_raw(st, p.iter().copied())?;
        while let Some(row) = rows.next()? {
            if !f(&row)? {
                break;
            }
        }
        Ok(())
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        postgres::Client::batch_execute(self, sql)
    }

    fn is_closed(&self) -> bool {
        postgres::Client::is_closed(self)
    }
}

/// A `tokio_postgres` client on a current-thread runtime of its own: its
/// connection task runs only while a call blocks on the runtime (as the
/// blocking crate's client), and [`Session::pipeline`] sends every
/// statement before it waits for the first answer.
///
/// Like the blocking crate's client it must not be used, or dropped, on
/// an async thread (the store's calls run on blocking threads; the pool's
/// drop closes it on a thread of its own).
pub(super) struct Pipelined {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Pipelined {
    /// Connects with `connect` (which makes the client and its
    /// connection) on `rt`, a new current-thread runtime ([`runtime`]).
    pub(super) fn connect<S, T, F>(
        rt: tokio::runtime::Runtime,
        connect: F,
    ) -> Result<Pipelined, Error>
    where
        F: Future<
            Output = Result<(tokio_postgres::Client, tokio_postgres::Connection<S, T>), Error>,
        >,
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (client, connection) = rt.block_on(connect)?;
        // Ends when the connection closes (the client then says closed).
        rt.spawn(async move {
            let _ = connection.await;
        });
        Ok(Pipelined { rt, client })
    }
}

/// The runtime a [`Pipelined`] session runs on.
pub(super) fn runtime() -> crate::store::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::store::StoreError::Backend(Box::new(e)))
}

impl Session for Pipelined {
    fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        self.rt.block_on(self.client.prepare(sql))
    }

    fn query(&mut self, st: &Statement, p: Params<'_>) -> Result<Vec<Row>, Error> {
        self.rt.block_on(self.client.query(st, p))
    }

    fn execute(&mut self, st: &Statement, p: Params<'_>) -> Result<u64, Error> {
        self.rt.block_on(self.client.execute(st, p))
    }

    fn each(
        &mut self,
        st: &Statement,
        p: Params<'_>,
        f: &mut dyn FnMut(&Row) -> crate::store::Result<bool>,
    ) -> crate::store::Result<()> {
        use futures_util::TryStreamExt;
        let client = &self.client;
        self.rt.block_on(async {
            let rows = client.query_raw(st, p.iter().copied()).await?;
            let mut rows = std::pin::pin!(rows);
            while let Some(row) = rows.try_next().await? {
                if !f(&row)? {
                    break;
                }
            }
            Ok(())
        })
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.rt.block_on(self.client.batch_execute(sql))
    }

    fn pipeline(&mut self, items: &[(&Statement, Want, Params<'_>)]) -> Vec<Result<Answer, Error>> {
        let client = &self.client;
        // Each call sends its statement when first polled, and `join_all`
        // polls them all, in order, before any waits: one round trip.
        let calls = items.iter().map(|(st, want, p)| async move {
            match want {
                Want::Rows => client.query(*st, p).await.map(Answer::Rows),
                Want::Count => client.execute(*st, p).await.map(Answer::Count),
            }
        });
        let mut out = self.rt.block_on(futures_util::future::join_all(calls));
        if let Some(first) = out.iter().position(Result::is_err) {
            out.truncate(first + 1);
        }
        out
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Prepared statements of one connection, by their text.
pub(super) type Cache = HashMap<&'static str, Statement>;
