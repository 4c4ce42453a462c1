// Thread-safety annotations: locking rules written into the declarations, so
// that Clang's -Wthread-safety checks them at compile time (`make lint`).
//
// A field that a mutex protects is declared `GUARDED_BY(mu_)`; a function that
// expects the caller to hold a mutex is declared `REQUIRES(mu_)`, and one that
// takes it itself `EXCLUDES(mu_)`. The mutex types that carry these rules are
// in common/mutex.h. Under GCC (the normal build) every macro is empty: the
// annotations cost nothing and change nothing, they are only checked.
#pragma once

#if defined(__clang__)
#define LAZYBLOCK_THREAD_ATTRIBUTE(...) __attribute__((__VA_ARGS__))
#else
#define LAZYBLOCK_THREAD_ATTRIBUTE(...)
#endif

// On a class: its objects are locks ("mutex" names the kind in messages).
#define CAPABILITY(kind) LAZYBLOCK_THREAD_ATTRIBUTE(capability(kind))
// On a class: an object that holds a lock from construction to destruction
// (or to an explicit unlock()).
#define SCOPED_CAPABILITY LAZYBLOCK_THREAD_ATTRIBUTE(scoped_lockable)

// On a field: read or written only while `mu` is held.
#define GUARDED_BY(mu) LAZYBLOCK_THREAD_ATTRIBUTE(guarded_by(mu))
// On a pointer field: what it points to is read or written only under `mu`.
#define PT_GUARDED_BY(mu) LAZYBLOCK_THREAD_ATTRIBUTE(pt_guarded_by(mu))
// On a mutex field: taken only after (or before) the mutexes named.
#define ACQUIRED_AFTER(...) LAZYBLOCK_THREAD_ATTRIBUTE(acquired_after(__VA_ARGS__))
#define ACQUIRED_BEFORE(...) LAZYBLOCK_THREAD_ATTRIBUTE(acquired_before(__VA_ARGS__))

// On a function: the caller holds the locks named (exclusively, or shared).
#define REQUIRES(...) LAZYBLOCK_THREAD_ATTRIBUTE(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) LAZYBLOCK_THREAD_ATTRIBUTE(requires_shared_capability(__VA_ARGS__))
// On a function: the caller does not hold them (the function takes them).
#define EXCLUDES(...) LAZYBLOCK_THREAD_ATTRIBUTE(locks_excluded(__VA_ARGS__))

// On a function: it takes (ACQUIRE) or lets go of (RELEASE) the locks named;
// with no argument, the object it is called on.
#define ACQUIRE(...) LAZYBLOCK_THREAD_ATTRIBUTE(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) LAZYBLOCK_THREAD_ATTRIBUTE(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) LAZYBLOCK_THREAD_ATTRIBUTE(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) LAZYBLOCK_THREAD_ATTRIBUTE(release_shared_capability(__VA_ARGS__))
// On a function: it takes the lock only when it returns `succeeded`.
#define TRY_ACQUIRE(...) LAZYBLOCK_THREAD_ATTRIBUTE(try_acquire_capability(__VA_ARGS__))
// On a function: it returns only if the lock is held (a run-time check the
// analysis then trusts).
#define ASSERT_CAPABILITY(mu) LAZYBLOCK_THREAD_ATTRIBUTE(assert_capability(mu))
// On a function: it returns the lock named (lets callers lock through it).
#define RETURN_CAPABILITY(mu) LAZYBLOCK_THREAD_ATTRIBUTE(lock_returned(mu))

// On a function: not checked at all. Only where the analysis cannot follow
// what the code does; each use says why.
#define NO_THREAD_SAFETY_ANALYSIS LAZYBLOCK_THREAD_ATTRIBUTE(no_thread_safety_analysis)
