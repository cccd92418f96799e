//! The gateway's memory allocator, and its options.
//!
//! `unsafe` here is the two lines that hand jemalloc its options: a symbol it reads before
//! `main` (a C `const char *`), which Rust can only define as an exported static.
#![allow(unsafe_code)]

/// jemalloc rather than glibc's allocator: a request allocates and frees many small values
/// (header maps, Cedar values, the audit record, the span), and glibc's `malloc`/`free` and
/// their consolidation were a fifth of the gateway's CPU. Measured side by side
/// (docs/benchmarks.md, "The allocator"): 12–18% less CPU per request, at about 10% more memory per held request.
/// mimalloc saved as much CPU but doubled the memory.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: its thread caches keep freed blocks of up to 64 KiB
/// (its default is 32 KiB). pingora allocates a 64 KiB buffer for every answer's body, and
/// blocks past the thread cache take jemalloc's slower path for large blocks (a lock and an
/// extent search per allocation and per free): 1.9% of the gateway's CPU in a profile of
/// plain HTTP (docs/benchmarks.md, "The allocator"). `_RJEM_MALLOC_CONF` in the environment
/// still overrides it.
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: JemallocOptions = JemallocOptions(c"tcache_max:65536".as_ptr());

/// A C string for jemalloc's `malloc_conf` (a `const char *`, read once at start-up).
#[repr(transparent)]
struct JemallocOptions(*const std::ffi::c_char);

// SAFETY: it points at a string literal, which lives for the whole run and is never written.
unsafe impl Sync for JemallocOptions {}
