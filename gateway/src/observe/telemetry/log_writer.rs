//! Where the gateway's log lines go: standard error, in batches, written by a thread of its
//! own.
//!
//! Every request leaves a log line. Written straight to stderr, each line would cost its
//! request's thread a `write` system call under stderr's lock — about half of what the line
//! costs in all (formatting is the other half). Here a line is appended to a buffer under a
//! short lock instead, and the `tollgate-log` thread writes what has accumulated every
//! [`FLUSH_INTERVAL`] in one call. Lines keep their order.
//!
//! A request's thread never writes to stderr itself, so a slow or stalled reader of the
//! gateway's stderr (a log shipper that stopped reading its pipe) cannot stop requests: the
//! lines wait in a buffer of up to [`MAX_PENDING_BYTES`] (besides the batch stderr is being
//! given, which is at most as large), and lines past that are dropped and counted
//! (`tollgate_log_lines_dropped_total`) until stderr takes writes again; so are the lines of
//! a write that fails. A panic's message goes the same way ([`StderrLog::panicked`]). The
//! audit trail, not the log, is the record that every request keeps.
//!
//! What an operator must not miss is not kept waiting: a warning or an error wakes the writer
//! thread at once, and so does a buffer past [`FLUSH_BYTES`]. Lines of info and below may
//! arrive up to one interval late, and are lost if the process is killed (`SIGKILL`) in that
//! interval; a clean shutdown, or a start-up that fails, has them written
//! ([`StderrLog::flush_within`], which gives up on a stderr that takes nothing).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a line of info and below may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// A buffer this large wakes the writer at once, whatever the level.
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The most bytes of lines kept while stderr does not take them (about ten thousand request
/// lines); lines that would go past it are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// Lines dropped since start because stderr did not take them fast enough (the process has
/// one stderr, so one count).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped since start because the buffer for stderr was full: what the
/// `tollgate_log_lines_dropped_total` counter shows.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The gateway's log writer (see the module documentation). Clones share one buffer.
#[derive(Clone)]
pub struct StderrLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// Lines logged since the last write to stderr.
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is written, so that batches reach their sink in the order they
    /// were taken.
    writing: Mutex<Writing>,
    /// The `tollgate-log` thread, woken for warnings and full buffers.
    writer: OnceLock<Thread>,
    /// Set when the writer has been woken and has not yet taken the buffer: a burst of
    /// lines wakes it once.
    woken: AtomicBool,
    /// Lines this writer dropped (the process's count is [`dropped`]).
    dropped: AtomicU64,
}

struct Writing {
    batch: Vec<u8>,
    sink: Box<dyn Write + Send>,
}

impl StderrLog {
    /// Starts the writer thread; it lives as long as the process.
    pub fn start() -> std::io::Result<StderrLog> {
        StderrLog::start_with(Box::new(std::io::stderr()), FLUSH_INTERVAL)
    }

    /// A writer to `sink` with its thread, which writes every `interval` (stderr and
    /// [`FLUSH_INTERVAL`] but in tests).
    fn start_with(sink: Box<dyn Write + Send>, interval: Duration) -> std::io::Result<StderrLog> {
        let log = StderrLog::unstarted(sink);
        let writer = log.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || loop {
                std::thread::park_timeout(interval);
                writer.inner.woken.store(false, Ordering::Relaxed);
                writer.flush();
            })?;
        let _ = log.inner.writer.set(thread.thread().clone());
        Ok(log)
    }

    /// A writer with no thread: lines wait until [`StderrLog::flush_within`].
    fn unstarted(sink: Box<dyn Write + Send>) -> StderrLog {
        StderrLog {
            inner: Arc::new(Inner {
                pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
                writing: Mutex::new(Writing {
                    batch: Vec::with_capacity(FLUSH_BYTES),
                    sink,
                }),
                writer: OnceLock::new(),
                woken: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Writes every line buffered so far, on the calling thread (the writer's own, and tests).
    fn flush(&self) {
        let mut writing = self.inner.writing.lock();
        let Writing { batch, sink } = &mut *writing;
        {
            let mut pending = self.inner.pending.lock();
            if pending.is_empty() {
                return;
            }
            std::mem::swap(&mut *pending, batch);
        }
        // Nothing better can be done with a failing stderr than to drop the lines: they are
        // counted as dropped.
        if sink.write_all(batch).and_then(|()| sink.flush()).is_err() {
            let lines = batch.iter().filter(|&&byte| byte == b'\n').count();
            self.count_dropped(lines as u64);
        }
        batch.clear();
        // A burst may have grown the buffer far past a batch: give that memory back.
        batch.shrink_to(FLUSH_BYTES);
    }

    /// Waits up to `limit` for every line buffered so far to be written (at shutdown). The
    /// writer thread writes them: a stderr that takes no writes keeps them, and this returns
    /// `false` at `limit`, never later.
    pub fn flush_within(&self, limit: Duration) -> bool {
        let Some(writer) = self.inner.writer.get() else {
            self.flush();
            return true;
        };
        let deadline = Instant::now() + limit;
        loop {
            // Nothing waits, and no batch is being written: all of it has been written.
            let waiting = !self.inner.pending.lock().is_empty();
            if !waiting && self.inner.writing.try_lock().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            writer.unpark();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Logs a panic as Rust's own hook would, but through the buffer, so that a panicking
    /// request's thread does not wait for stderr either. A panic on the main thread (the
    /// process is ending) waits up to a second for its line to be written.
    pub fn panicked(&self, info: &std::panic::PanicHookInfo<'_>) {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let message = info.payload_as_str().unwrap_or("Box<dyn Any>");
        let location = info
            .location()
            .map_or_else(String::new, |at| format!(" at {at}"));
        let mut line = format!("thread '{name}' panicked{location}:\n{message}\n");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            line.push_str(&format!("stack backtrace:\n{backtrace}\n"));
        }
        self.append(line.as_bytes(), true);
        if name == "main" {
            self.flush_within(Duration::from_secs(1));
        }
    }

    fn count_dropped(&self, lines: u64) {
        self.inner.dropped.fetch_add(lines, Ordering::Relaxed);
        DROPPED.fetch_add(lines, Ordering::Relaxed);
    }

    /// Appends whole lines, or drops them if the buffer is full; `urgent` ones (and a full
    /// batch) wake the writer thread. Never waits for stderr.
    pub(super) fn append(&self, line: &[u8], urgent: bool) {
        let wake = {
            let mut pending = self.inner.pending.lock();
            if pending.len() + line.len() > MAX_PENDING_BYTES {
                drop(pending);
                self.count_dropped(1);
                true
            } else {
                pending.extend_from_slice(line);
                urgent || pending.len() >= FLUSH_BYTES
            }
        };
        if wake && !self.inner.woken.swap(true, Ordering::Relaxed) {
            if let Some(writer) = self.inner.writer.get() {
                writer.unpark();
            }
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
    use std::sync::mpsc;
    use std::time::Instant;

    /// A sink the test reads, and can stall like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        stalled: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    }

    impl Sink {
        fn stall(&self, stalled: bool) {
            let (flag, changed) = &*self.stalled;
            *flag.lock().unwrap_or_else(|e| e.into_inner()) = stalled;
            changed.notify_all();
        }

        fn written(&self) -> Vec<u8> {
            self.written.lock().clone()
        }

        /// Waits up to 10 s for `want` to be written in full.
        fn wait_for(&self, want: &[u8]) -> Vec<u8> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let written = self.written();
                if written.windows(want.len()).any(|w| w == want) || Instant::now() > deadline {
                    return written;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (flag, changed) = &*self.stalled;
            let mut stalled = flag.lock().unwrap_or_else(|e| e.into_inner());
            while *stalled {
                stalled = changed.wait(stalled).unwrap_or_else(|e| e.into_inner());
            }
            self.written.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn info_lines_wait_for_the_writer_and_warnings_wake_it_with_every_line_in_order() {
        // An interval no test waits for: what is written came from a wake-up or a flush.
        let sink = Sink::default();
        let log = StderrLog::start_with(Box::new(sink.clone()), Duration::from_secs(3600))
            .expect("writer thread");
        let (info, warn) = (event_at(Level::INFO), event_at(Level::WARN));
        log.make_writer_for(&info).write_all(b"one\n").unwrap();
        log.make_writer_for(&info).write_all(b"two\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            sink.written().is_empty(),
            "info lines wait for the interval"
        );
        log.make_writer_for(&warn).write_all(b"three\n").unwrap();
        assert_eq!(
            sink.wait_for(b"three\n"),
            b"one\ntwo\nthree\n",
            "a warning wakes the writer, which writes the lines before it first"
        );
        // A buffer past a batch's size wakes the writer whatever the level.
        let big = [b"x".repeat(FLUSH_BYTES - 1), b"\n".to_vec()].concat();
        log.make_writer_for(&info).write_all(&big).unwrap();
        assert!(
            sink.wait_for(&big).ends_with(&big),
            "a full batch is written at once"
        );
        log.make_writer_for(&info).write_all(b"four\n").unwrap();
        log.flush();
        assert!(
            sink.written().ends_with(b"x\nfour\n"),
            "flush writes what waits"
        );
    }

    #[test]
    fn a_stalled_stderr_never_stops_the_threads_that_log_and_costs_at_most_the_buffer() {
        let sink = Sink::default();
        sink.stall(true);
        let log = StderrLog::start_with(Box::new(sink.clone()), Duration::from_millis(1))
            .expect("writer thread");
        // Numbered lines of 1,000 bytes.
        let line = |n: usize| format!("{n:0>999}\n").into_bytes();
        let lines = 3 * MAX_PENDING_BYTES / 1000;
        // Requests log from their own threads: those must all get through with stderr
        // stalled (before, the thread that filled the buffer wrote it, and waited).
        let (done, finished) = mpsc::channel();
        let logging = log.clone();
        let (info, warn) = (event_at(Level::INFO), event_at(Level::WARN));
        std::thread::spawn(move || {
            for n in 0..lines {
                let level = if n % 100 == 0 { &warn } else { &info };
                logging.make_writer_for(level).write_all(&line(n)).unwrap();
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("logging went on with stderr stalled");
        let pending_now = log.inner.pending.lock().len();
        assert!(
            pending_now <= MAX_PENDING_BYTES,
            "the buffer is bounded: {pending_now}"
        );
        // The writer took one batch before it stalled; the buffer holds at most its limit.
        let kept = (MAX_PENDING_BYTES / 1000) as u64;
        let dropped_now = log.inner.dropped.load(Ordering::Relaxed);
        assert!(
            dropped_now >= lines as u64 - 2 * kept && dropped_now < lines as u64,
            "{dropped_now} of {lines} lines dropped"
        );
        // Shutting down does not wait for a stalled stderr past its limit.
        assert!(!log.flush_within(Duration::from_millis(100)));
        // Once stderr takes writes again, what was kept arrives whole and in order.
        sink.stall(false);
        assert!(
            log.flush_within(Duration::from_secs(30)),
            "written once stderr takes writes"
        );
        let written = sink.written();
        assert_eq!(written.len() % 1000, 0, "no partial line");
        let numbers: Vec<usize> = written
            .chunks(1000)
            .map(|l| {
                let text = std::str::from_utf8(&l[..999]).expect("a number");
                text.parse().expect("a number")
            })
            .collect();
        assert_eq!(
            numbers.len() as u64,
            lines as u64 - dropped_now,
            "every line not dropped"
        );
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn lines_a_failing_stderr_did_not_take_are_counted_as_dropped() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = StderrLog::unstarted(Box::new(Closed));
        let before = dropped();
        log.append(b"one\ntwo\n", false);
        log.append(b"three\n", false);
        log.flush();
        assert_eq!(
            log.inner.dropped.load(Ordering::Relaxed),
            3,
            "the batch's lines"
        );
        assert!(dropped() - before >= 3, "and the process's count");
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
