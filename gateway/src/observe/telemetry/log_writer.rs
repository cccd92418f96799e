//! Where the gateway's log lines go: standard error, in batches, written by a thread of its
//! own.
//!
//! Every request leaves a log line. Written straight to stderr, each line would cost its
//! request's thread a `write` system call under stderr's lock — about half of what the line
//! costs in all (formatting is the other half). Here a line is appended to a buffer under a
//! short lock instead, and the `tollgate-log` thread writes what has accumulated every
//! [`FLUSH_INTERVAL`] in one call. Lines keep their order.
//!
//! What an operator must not miss is not kept waiting: a warning or an error writes the
//! buffer (its own line last) at once, and so does a buffer past [`FLUSH_BYTES`]. Lines of
//! info and below may arrive up to one interval late, and are lost if the process is killed
//! (`SIGKILL`) in that interval; a clean shutdown writes them ([`StderrLog::flush`]).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line of info and below may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// A buffer this large is written at once, whatever the level.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The gateway's log writer (see the module documentation). Clones share one buffer.
#[derive(Clone)]
pub struct StderrLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// Lines logged since the last write to stderr.
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is written, so that batches reach stderr in the order they were
    /// taken.
    writing: Mutex<Vec<u8>>,
}

impl StderrLog {
    /// Starts the writer thread; it lives as long as the process.
    pub fn start() -> std::io::Result<StderrLog> {
        let log = StderrLog {
            inner: Arc::new(Inner {
                pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
                writing: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
            }),
        };
        let writer = log.clone();
        std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_INTERVAL);
                writer.flush();
            })?;
        Ok(log)
    }

    /// Writes every line buffered so far.
    pub fn flush(&self) {
        let mut batch = self.inner.writing.lock();
        {
            let mut pending = self.inner.pending.lock();
            if pending.is_empty() {
                return;
            }
            std::mem::swap(&mut *pending, &mut *batch);
        }
        // Nothing better can be done with a failing stderr than to drop the lines.
        let _ = std::io::stderr().lock().write_all(&batch);
        batch.clear();
        // A burst may have grown the buffer far past a batch: give that memory back.
        batch.shrink_to(FLUSH_BYTES);
    }

    /// Appends whole lines; `urgent` ones (and a full buffer) are written at once.
    pub(super) fn append(&self, line: &[u8], urgent: bool) {
        let full = {
            let mut pending = self.inner.pending.lock();
            pending.extend_from_slice(line);
            pending.len() >= FLUSH_BYTES
        };
        if urgent || full {
            self.flush();
        }
    }
}

/// One event's writer: `tracing_subscriber` formats the event, then writes its line whole.
pub struct LineWriter<'a> {
    log: &'a StderrLog,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.log.append(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StderrLog {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            log: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            log: self,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(log: &StderrLog) -> Vec<u8> {
        log.inner.pending.lock().clone()
    }

    #[test]
    fn info_lines_wait_for_the_writer_and_warnings_take_them_along_in_order() {
        // No thread: the test drives the flushes.
        let log = StderrLog {
            inner: Arc::new(Inner {
                pending: Mutex::new(Vec::new()),
                writing: Mutex::new(Vec::new()),
            }),
        };
        let (info, warn) = (event_at(Level::INFO), event_at(Level::WARN));
        log.make_writer_for(&info).write_all(b"one\n").unwrap();
        log.make_writer_for(&info).write_all(b"two\n").unwrap();
        assert_eq!(
            pending(&log),
            b"one\ntwo\n",
            "info lines are buffered, in order"
        );
        log.make_writer_for(&warn).write_all(b"three\n").unwrap();
        assert!(
            pending(&log).is_empty(),
            "a warning writes the buffer at once"
        );
        // A buffer past its size is written whatever the level.
        let big = vec![b'x'; FLUSH_BYTES];
        log.make_writer_for(&info).write_all(&big).unwrap();
        assert!(pending(&log).is_empty(), "a full buffer is written at once");
        log.make_writer_for(&info).write_all(b"four\n").unwrap();
        log.flush();
        assert!(pending(&log).is_empty(), "flush writes what waits");
    }

    fn event_at(level: Level) -> Metadata<'static> {
        Metadata::new(
            "event",
            "t",
            level,
            None,
            None,
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        )
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!("not registered")
        }
    }
}
