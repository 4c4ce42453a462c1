#include "common/status.h"

#include <cerrno>
#include <cstring>

namespace lazyblock {

std::string_view status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kNotFound:
      return "not found";
    case StatusCode::kInvalidArgument:
      return "invalid argument";
    case StatusCode::kOutOfRange:
      return "out of range";
    case StatusCode::kIoError:
      return "I/O error";
    case StatusCode::kCorruption:
      return "corruption";
    case StatusCode::kTimeout:
      return "timeout";
    case StatusCode::kCancelled:
      return "cancelled";
    case StatusCode::kUnavailable:
      return "unavailable";
    case StatusCode::kNoSpace:
      return "no space";
    case StatusCode::kAlreadyExists:
      return "already exists";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (is_ok()) return "ok";
  return std::string(status_code_name(code_)) + ": " + message_;
}

Status Status::with_context(std::string_view context) const {
  if (is_ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

Status posix_error(std::string_view context, int err) {
  std::string msg = std::string(context) + ": " + std::strerror(err);
  switch (err) {
    case ENOENT:
      return Status::not_found(std::move(msg));
    case EINVAL:
      return Status::invalid_argument(std::move(msg));
    case ETIMEDOUT:
      return Status::timeout(std::move(msg));
    case EAGAIN:
    case EINTR:
    case ECONNRESET:
      return Status::unavailable(std::move(msg));
    case ENOSPC:
    case EDQUOT:
      return Status::no_space(std::move(msg));
    case EEXIST:
      return Status::already_exists(std::move(msg));
    default:
      return Status::io_error(std::move(msg));
  }
}

}  // namespace lazyblock
