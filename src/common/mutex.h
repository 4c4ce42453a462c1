// Mutex, MutexLock, CondVar: std::mutex, a scoped lock and a condition
// variable that carry Clang's thread-safety annotations
// (common/thread_annotations.h), so that a field declared GUARDED_BY(mu_) and
// touched without mu_ held fails `make lint`.
//
//   Mutex mu_;
//   CondVar changed_;
//   int count_ GUARDED_BY(mu_) = 0;
//
//   MutexLock lock(mu_);
//   changed_.wait(lock, [&]() REQUIRES(mu_) { return count_ > 0; });
//
// A predicate handed to a CondVar runs with the mutex held, which the
// analysis cannot see from inside the lambda: say so with REQUIRES(mu_) on
// the lambda. The types add nothing at run time over the standard ones.
#pragma once

#include <atomic>
#include <cassert>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stop_token>
#include <thread>
#include <utility>

#include "common/thread_annotations.h"

namespace lazyblock {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() {
    mu_.lock();
    note_owner();
  }
  void unlock() RELEASE() {
    forget_owner();
    mu_.unlock();
  }
  bool try_lock() TRY_ACQUIRE(true) {
    if (!mu_.try_lock()) return false;
    note_owner();
    return true;
  }
  // Tells the analysis that the calling thread holds this mutex, where it
  // cannot see that for itself: the mutex was reached through another
  // object than the one the caller locked it through. Debug builds check it
  // (abort if not held); release builds trust it.
  void assert_held() const ASSERT_CAPABILITY(this) {
    assert(owner_.load(std::memory_order_relaxed) == std::this_thread::get_id());
  }

 private:
  friend class MutexLock;

#ifdef NDEBUG
  void note_owner() {}
  void forget_owner() {}
#else
  // Only the holder writes owner_, and only the holder's own id is compared
  // with it, so relaxed order is enough.
  void note_owner() { owner_.store(std::this_thread::get_id(), std::memory_order_relaxed); }
  void forget_owner() { owner_.store(std::thread::id(), std::memory_order_relaxed); }
  std::atomic<std::thread::id> owner_;
#endif
  std::mutex mu_;
};

// Holds a Mutex from construction to destruction. unlock() and lock() let
// go of it and take it again in between, as std::unique_lock does.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() RELEASE() {
    if (locked_) mu_.unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void lock() ACQUIRE() {
    mu_.lock();
    locked_ = true;
  }
  void unlock() RELEASE() {
    locked_ = false;
    mu_.unlock();
  }

 private:
  friend class CondVar;
  friend class StoppableCondVar;

  // Runs a standard wait on the held std::mutex; the mutex is held again
  // when `wait` returns or calls a predicate, and noted as this thread's.
  template <class Wait>
  auto with_native_lock(Wait wait) {
    std::unique_lock<std::mutex> native(mu_.mu_, std::adopt_lock);
    struct Rearm {  // also when `wait` throws
      std::unique_lock<std::mutex>& native;
      Mutex& mu;
      ~Rearm() {
        native.release();
        mu.note_owner();
      }
    } rearm{native, mu_};
    return wait(native);
  }
  // `ready`, noting first that this thread holds the mutex again. Not
  // analysed: it runs inside the standard wait, with the mutex held.
  template <class Predicate>
  auto noting_owner(Predicate& ready) {
    return [this, &ready]() NO_THREAD_SAFETY_ANALYSIS {
      mu_.note_owner();
      return ready();
    };
  }

  Mutex& mu_;
  bool locked_ = true;
};

// A condition variable waited on through a MutexLock. The waits are not
// analysed (NO_THREAD_SAFETY_ANALYSIS): the standard wait lets go of the
// mutex and takes it back before it returns or calls the predicate, which the
// analysis cannot follow into the standard library; the caller's MutexLock
// is held on both sides of the call, as the analysis assumes.
class CondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }
  void notify_all() noexcept { cv_.notify_all(); }

  void wait(MutexLock& lock) NO_THREAD_SAFETY_ANALYSIS {
    lock.with_native_lock([&](auto& native) { cv_.wait(native); });
  }
  template <class Predicate>
  void wait(MutexLock& lock, Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    lock.with_native_lock([&](auto& native) { cv_.wait(native, lock.noting_owner(ready)); });
  }
  template <class Clock, class Duration>
  std::cv_status wait_until(MutexLock& lock, const std::chrono::time_point<Clock, Duration>& until)
      NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock([&](auto& native) { return cv_.wait_until(native, until); });
  }
  template <class Clock, class Duration, class Predicate>
  bool wait_until(MutexLock& lock, const std::chrono::time_point<Clock, Duration>& until,
                  Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock(
        [&](auto& native) { return cv_.wait_until(native, until, lock.noting_owner(ready)); });
  }
  template <class Rep, class Period>
  std::cv_status wait_for(MutexLock& lock, const std::chrono::duration<Rep, Period>& timeout)
      NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock([&](auto& native) { return cv_.wait_for(native, timeout); });
  }
  template <class Rep, class Period, class Predicate>
  bool wait_for(MutexLock& lock, const std::chrono::duration<Rep, Period>& timeout,
                Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock(
        [&](auto& native) { return cv_.wait_for(native, timeout, lock.noting_owner(ready)); });
  }

 private:
  std::condition_variable cv_;
};

// A condition variable whose waits also end on a stop request
// (std::condition_variable_any's stop_token waits). Not analysed, for the
// reason CondVar's waits are not.
class StoppableCondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }
  void notify_all() noexcept { cv_.notify_all(); }

  template <class Predicate>
  void wait(MutexLock& lock, Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    lock.with_native_lock([&](auto& native) { cv_.wait(native, lock.noting_owner(ready)); });
  }
  template <class Predicate>
  bool wait(MutexLock& lock, std::stop_token stop, Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock(
        [&](auto& native) { return cv_.wait(native, std::move(stop), lock.noting_owner(ready)); });
  }
  template <class Clock, class Duration, class Predicate>
  bool wait_until(MutexLock& lock, std::stop_token stop,
                  const std::chrono::time_point<Clock, Duration>& until,
                  Predicate ready) NO_THREAD_SAFETY_ANALYSIS {
    return lock.with_native_lock([&](auto& native) {
      return cv_.wait_until(native, std::move(stop), until, lock.noting_owner(ready));
    });
  }

 private:
  std::condition_variable_any cv_;
};

}  // namespace lazyblock
