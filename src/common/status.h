// Status and Result<T>: how every fallible call in lazyblock reports failure.
//
// A Status is a code (what kind of failure, for callers that branch on it) and
// a message (what happened, for the human reading the log: it names the object
// and the cause). No exceptions cross a module boundary; errno becomes a Status
// in exactly one place, posix_error().
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace lazyblock {

enum class StatusCode {
  kOk = 0,
  kNotFound,         // the object or key does not exist
  kInvalidArgument,  // the caller asked for something malformed
  kOutOfRange,       // a range starts past the end of an object
  kIoError,          // a local or remote I/O operation failed
  kCorruption,       // data or metadata does not match what was promised
  kTimeout,          // a deadline passed
  kCancelled,        // the work was abandoned (shutdown)
  kUnavailable,      // a transient failure: worth retrying
  kNoSpace,          // the local file system (or quota) is full
  kAlreadyExists,    // the thing exists or is in use, and replacing it was not asked for
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK

  static Status ok() { return Status(); }
  static Status not_found(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
  static Status invalid_argument(std::string msg) {
    return {StatusCode::kInvalidArgument, std::move(msg)};
  }
  static Status out_of_range(std::string msg) { return {StatusCode::kOutOfRange, std::move(msg)}; }
  static Status io_error(std::string msg) { return {StatusCode::kIoError, std::move(msg)}; }
  static Status corruption(std::string msg) { return {StatusCode::kCorruption, std::move(msg)}; }
  static Status timeout(std::string msg) { return {StatusCode::kTimeout, std::move(msg)}; }
  static Status cancelled(std::string msg) { return {StatusCode::kCancelled, std::move(msg)}; }
  static Status unavailable(std::string msg) { return {StatusCode::kUnavailable, std::move(msg)}; }
  static Status no_space(std::string msg) { return {StatusCode::kNoSpace, std::move(msg)}; }
  static Status already_exists(std::string msg) {
    return {StatusCode::kAlreadyExists, std::move(msg)};
  }

  bool is_ok() const { return code_ == StatusCode::kOk; }
  explicit operator bool() const { return is_ok(); }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "not found: object not found: a/b" style text for logs and stderr.
  std::string to_string() const;

  // The same status with "context: " put in front of its message.
  Status with_context(std::string_view context) const;

 private:
  Status(StatusCode code, std::string msg) : code_(code), message_(std::move(msg)) {
    assert(code != StatusCode::kOk);
  }

  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// The Status for the errno value `err` of a failed call, e.g.
// posix_error("open /tmp/x", ENOENT) -> not_found("open /tmp/x: No such file...").
Status posix_error(std::string_view context, int err);

// Either a value or the Status saying why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : state_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : state_(std::move(status)) {  // NOLINT: implicit by design
    assert(!std::get<Status>(state_).is_ok());
  }

  bool is_ok() const { return std::holds_alternative<T>(state_); }
  explicit operator bool() const { return is_ok(); }

  const Status& status() const {
    static const Status kOk;
    return is_ok() ? kOk : std::get<Status>(state_);
  }
  T& value() & {
    assert(is_ok());
    return std::get<T>(state_);
  }
  const T& value() const& {
    assert(is_ok());
    return std::get<T>(state_);
  }
  T&& value() && {
    assert(is_ok());
    return std::get<T>(std::move(state_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> state_;
};

}  // namespace lazyblock

// Returns early from the enclosing function with the error of `expr` (a Status).
#define LB_RETURN_IF_ERROR(expr)                \
  do {                                          \
    ::lazyblock::Status lb_status_ = (expr);    \
    if (!lb_status_.is_ok()) return lb_status_; \
  } while (0)
