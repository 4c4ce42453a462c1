#include "storage/http_client.h"

#include <curl/curl.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <stop_token>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// libcurl's receive buffer: large, so that a chunk costs few system calls
// (libcurl still hands the body over in pieces of CURL_MAX_WRITE_SIZE).
constexpr long kReceiveBuffer = 256 * 1024;
// Body bytes held for a reader that has not asked for them yet (those that
// come with the headers, or beyond a read's buffer); beyond this the
// transfer pauses (TCP then holds the rest), so memory stays small.
constexpr size_t kSpillCapacity = kReceiveBuffer;
// Longest single wait in the transfer loop: deadlines and stalls are checked
// at least this often even if libcurl wants to wait longer.
constexpr std::chrono::milliseconds kMaxPoll{1000};
// Idle connections kept per client: enough for a chunker's streams.
constexpr size_t kMaxIdle = 32;

void init_curl_once() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\r' ||
                           text.back() == '\n')) {
    text.remove_suffix(1);
  }
  return text;
}

// Whether a transport failure may pass if tried again. A name that does not
// resolve is taken as a typo, not an outage: failing at once says so sooner
// than a minute of retries would.
bool transient(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_AGAIN:
      return true;
    default:
      return false;
  }
}

}  // namespace

struct HttpClient::Share {
  Share() {
    handle = curl_share_init();
    curl_share_setopt(handle, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
    curl_share_setopt(handle, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    curl_share_setopt(handle, CURLSHOPT_LOCKFUNC, &Share::lock);
    curl_share_setopt(handle, CURLSHOPT_UNLOCKFUNC, &Share::unlock);
    curl_share_setopt(handle, CURLSHOPT_USERDATA, this);
  }
  ~Share() { curl_share_cleanup(handle); }

  static void lock(CURL*, curl_lock_data data, curl_lock_access, void* self) {
    static_cast<Share*>(self)->mutexes[data].lock();
  }
  static void unlock(CURL*, curl_lock_data data, void* self) {
    static_cast<Share*>(self)->mutexes[data].unlock();
  }

  CURLSH* handle;
  std::mutex mutexes[CURL_LOCK_DATA_LAST];
};

struct HttpClient::Connection {
  Connection() : easy(curl_easy_init()), multi(curl_multi_init()) {
    // A piece may land on a full spill buffer once (see on_body).
    spill.reserve(kSpillCapacity + CURL_MAX_WRITE_SIZE);
  }
  ~Connection() {
    curl_easy_cleanup(easy);
    curl_multi_cleanup(multi);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  CURL* const easy;
  CURLM* const multi;
  std::vector<std::byte> spill;
};

// One request and its response: an easy handle on a multi handle of its own,
// driven by the thread that reads it.
class HttpClient::Transfer final : public HttpResponse {
 public:
  Transfer(HttpClient& client, const HttpRequest& request, const IoContext& io)
      : client_(client),
        method_(request.method),
        url_(request.url),
        io_(io),
        stall_timeout_(client.options().stall_timeout),
        upload_(request.body),
        connection_(client.acquire()),
        easy_(connection_->easy),
        multi_(connection_->multi),
        spill_(connection_->spill) {
    error_[0] = '\0';
    curl_easy_setopt(easy_, CURLOPT_URL, url_.c_str());
    curl_easy_setopt(easy_, CURLOPT_SHARE, client.share_->handle);
    curl_easy_setopt(easy_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy_, CURLOPT_ERRORBUFFER, error_);
    curl_easy_setopt(easy_, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_2TLS));
    curl_easy_setopt(easy_, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(easy_, CURLOPT_BUFFERSIZE, kReceiveBuffer);
    if (!client.options().ca_file.empty()) {
      curl_easy_setopt(easy_, CURLOPT_CAINFO, client.options().ca_file.c_str());
    }
    curl_easy_setopt(easy_, CURLOPT_CONNECTTIMEOUT_MS,
                     static_cast<long>(client.options().connect_timeout.count()));
    curl_easy_setopt(easy_, CURLOPT_HEADERFUNCTION, &Transfer::on_header);
    curl_easy_setopt(easy_, CURLOPT_HEADERDATA, this);
    curl_easy_setopt(easy_, CURLOPT_WRITEFUNCTION, &Transfer::on_body);
    curl_easy_setopt(easy_, CURLOPT_WRITEDATA, this);
    for (const auto& [name, value] : request.headers) {
      headers_ = curl_slist_append(headers_, fmt::format("{}: {}", name, value).c_str());
    }
    if (method_ == "HEAD") {
      curl_easy_setopt(easy_, CURLOPT_NOBODY, 1L);
    } else if (method_ == "PUT") {
      curl_easy_setopt(easy_, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(easy_, CURLOPT_READFUNCTION, &Transfer::on_upload);
      curl_easy_setopt(easy_, CURLOPT_READDATA, this);
      curl_easy_setopt(easy_, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(upload_.size()));
      // No 100-continue round trip before the body.
      headers_ = curl_slist_append(headers_, "Expect:");
    } else if (method_ == "POST") {
      curl_easy_setopt(easy_, CURLOPT_POST, 1L);
      curl_easy_setopt(easy_, CURLOPT_POSTFIELDS, upload_.data());
      curl_easy_setopt(easy_, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(upload_.size()));
      headers_ = curl_slist_append(headers_, "Expect:");
    } else if (method_ != "GET") {
      curl_easy_setopt(easy_, CURLOPT_CUSTOMREQUEST, method_.c_str());
    }
    curl_easy_setopt(easy_, CURLOPT_HTTPHEADER, headers_);
    curl_multi_add_handle(multi_, easy_);
    // A stop wakes a transfer blocked in curl_multi_poll at once.
    stop_wakeup_.emplace(io_.stop, Waker{multi_});
  }

  ~Transfer() override {
    stop_wakeup_.reset();
    curl_multi_remove_handle(multi_, easy_);
    spill_.clear();
    // A connection is worth keeping only after a clean, complete response.
    client_.release(std::move(connection_), finished_ && result_ == CURLE_OK);
    curl_slist_free_all(headers_);
  }

  // Runs the transfer until the response's headers are in.
  Status start() {
    last_progress_ = Clock::now();
    LB_RETURN_IF_ERROR(drive([this] { return headers_done_; }));
    if (!headers_done_) return finished_status();
    return Status::ok();
  }

  long status() const override { return status_; }

  std::optional<std::string> header(std::string_view name) const override {
    for (auto it = response_headers_.rbegin(); it != response_headers_.rend(); ++it) {
      if (iequals(it->first, name)) return it->second;
    }
    return std::nullopt;
  }

  Result<size_t> read(std::span<std::byte> buffer) override {
    if (buffer.empty()) return size_t{0};
    if (spill_at_ < spill_.size()) {
      const size_t take = std::min(buffer.size(), spill_.size() - spill_at_);
      std::memcpy(buffer.data(), spill_.data() + spill_at_, take);
      spill_at_ += take;
      if (spill_at_ == spill_.size()) {
        spill_.clear();
        spill_at_ = 0;
      }
      return take;
    }
    if (finished_) {
      LB_RETURN_IF_ERROR(finished_status());
      return size_t{0};
    }
    // libcurl writes into `buffer` from here until the read returns.
    target_ = buffer;
    target_filled_ = 0;
    Status driven = Status::ok();
    if (paused_) {
      paused_ = false;
      last_progress_ = Clock::now();
      curl_easy_pause(easy_, CURLPAUSE_CONT);  // may deliver bytes at once
    }
    if (target_filled_ == 0) driven = drive([this] { return target_filled_ > 0; });
    const size_t filled = target_filled_;
    target_ = {};
    target_filled_ = 0;
    if (filled > 0) return filled;  // a failure, if any, recurs on the next read
    LB_RETURN_IF_ERROR(driven);
    // Nothing came and drive() ended: the transfer is over (no byte was
    // spilled, since spilling starts only once the buffer is full).
    LB_RETURN_IF_ERROR(finished_status());
    return size_t{0};
  }

 private:
  struct Waker {
    CURLM* multi;
    void operator()() const { curl_multi_wakeup(multi); }
  };

  static size_t on_header(char* data, size_t, size_t size, void* self_pointer) {
    auto* self = static_cast<Transfer*>(self_pointer);
    self->last_progress_ = Clock::now();
    const std::string_view line(data, size);
    if (line.rfind("HTTP/", 0) == 0) {
      // A new status line: the headers of an interim (1xx) response are
      // forgotten.
      self->response_headers_.clear();
      self->headers_done_ = false;
    } else if (trim(line).empty()) {
      long code = 0;
      curl_easy_getinfo(self->easy_, CURLINFO_RESPONSE_CODE, &code);
      if (code >= 200) {
        self->status_ = code;
        self->headers_done_ = true;
      }
    } else if (const size_t colon = line.find(':'); colon != std::string_view::npos) {
      self->response_headers_.emplace_back(std::string(trim(line.substr(0, colon))),
                                           std::string(trim(line.substr(colon + 1))));
    }
    return size;
  }

  // A piece of the body (at most CURL_MAX_WRITE_SIZE bytes): into the
  // waiting read's buffer as far as it goes, the rest into the spill buffer;
  // refused (the transfer pauses) when neither has room.
  //
  // The transfer pauses as soon as the read's buffer is full (or, with no
  // read waiting, at the first byte): libcurl goes on receiving while the
  // socket has bytes (within one curl_multi_perform), and every byte it
  // receives past the buffer is copied twice, into the spill buffer, or into
  // libcurl's own pause buffer once the spill is full, and from there into
  // the next read's buffer.
  // Pausing here stops it after the receive it is handing over, so only the
  // rest of that one receive spills; when the socket holds a receive
  // buffer's worth, which is when the reader is the slower side, each read
  // takes exactly one receive, copied once.
  static size_t on_body(char* data, size_t, size_t size, void* self_pointer) {
    auto* self = static_cast<Transfer*>(self_pointer);
    const size_t room = self->target_.size() - self->target_filled_;
    if (room == 0 && self->spill_.size() - self->spill_at_ >= kSpillCapacity) {
      // Not consumed: libcurl hands the same bytes again once unpaused.
      self->paused_ = true;
      return CURL_WRITEFUNC_PAUSE;
    }
    self->last_progress_ = Clock::now();
    const auto* bytes = reinterpret_cast<const std::byte*>(data);
    const size_t direct = std::min(room, size);
    if (direct > 0) {
      std::memcpy(self->target_.data() + self->target_filled_, bytes, direct);
      self->target_filled_ += direct;
    }
    if (self->target_filled_ == self->target_.size() && !self->paused_) {
      // (This piece is consumed: libcurl hands over the rest of its
      // receive, which spills, and then stops receiving.) Also when no read
      // waits (body bytes that come with the headers).
      self->paused_ = true;
      curl_easy_pause(self->easy_, CURLPAUSE_RECV);
    }
    // Bytes are spilled only once the read's buffer is full, so they follow
    // its bytes in order.
    self->spill_.insert(self->spill_.end(), bytes + direct, bytes + size);
    return size;
  }

  static size_t on_upload(char* buffer, size_t, size_t size, void* self_pointer) {
    auto* self = static_cast<Transfer*>(self_pointer);
    self->last_progress_ = Clock::now();
    const size_t take = std::min(size, self->upload_.size() - self->uploaded_);
    std::memcpy(buffer, self->upload_.data() + self->uploaded_, take);
    self->uploaded_ += take;
    return take;
  }

  // Runs libcurl until `ready()`, the end of the transfer, the deadline, a
  // stop, or a stall.
  Status drive(const std::function<bool()>& ready) {
    for (;;) {
      int running = 0;
      curl_multi_perform(multi_, &running);
      int left = 0;
      while (CURLMsg* message = curl_multi_info_read(multi_, &left)) {
        if (message->msg == CURLMSG_DONE) {
          finished_ = true;
          result_ = message->data.result;
        }
      }
      if (ready() || finished_) return Status::ok();
      LB_RETURN_IF_ERROR(io_.check(fmt::format("{} {}", method_, url_)));
      const Clock::time_point now = Clock::now();
      if (!paused_ && now - last_progress_ >= stall_timeout_) {
        return Status::unavailable(fmt::format("{} {}: stalled, no byte for {} ms", method_, url_,
                                               stall_timeout_.count()));
      }
      auto wait = std::min<Clock::duration>(kMaxPoll, last_progress_ + stall_timeout_ - now);
      if (io_.deadline != Clock::time_point::max()) wait = std::min(wait, io_.deadline - now);
      const int wait_ms = static_cast<int>(std::max<int64_t>(
          1, std::chrono::duration_cast<std::chrono::milliseconds>(wait).count()));
      curl_multi_poll(multi_, nullptr, 0, wait_ms, nullptr);
    }
  }

  // The outcome of a finished transfer.
  Status finished_status() const {
    if (result_ == CURLE_OK) return Status::ok();
    const std::string_view detail = error_[0] != '\0' ? error_ : curl_easy_strerror(result_);
    std::string message = fmt::format("{} {}: {}", method_, url_, detail);
    message += advice(detail);
    return transient(result_) ? Status::unavailable(message) : Status::io_error(message);
  }

  // What to do about a failure that another try would not mend.
  std::string advice(std::string_view detail) const {
    const std::string& ca_file = client_.options().ca_file;
    const std::string trusted =
        ca_file.empty() ? "the system's CAs" : fmt::format("the CAs of {}", ca_file);
    switch (result_) {
      case CURLE_COULDNT_RESOLVE_HOST:
        return " (the host name does not resolve: check the store URL)";
      case CURLE_PEER_FAILED_VERIFICATION:
        if (detail.find("name") != std::string_view::npos) {
          return " (TLS: the server's certificate is not valid for this host name: use the "
                 "name the certificate was issued for)";
        }
        return fmt::format(
            " (TLS: the server's certificate is not signed by {}: name its CA "
            "with --ca-file, AWS_CA_BUNDLE or SSL_CERT_FILE)",
            trusted);
      case CURLE_SSL_CACERT_BADFILE:
        return fmt::format(" (TLS: the CA file {} cannot be read)",
                           ca_file.empty() ? "of the system" : ca_file);
      default:
        return "";
    }
  }

  HttpClient& client_;
  const std::string method_;
  const std::string url_;
  const IoContext io_;
  const std::chrono::milliseconds stall_timeout_;
  const std::span<const std::byte> upload_;
  size_t uploaded_ = 0;

  std::unique_ptr<Connection> connection_;
  CURL* const easy_;
  CURLM* const multi_;
  curl_slist* headers_ = nullptr;
  char error_[CURL_ERROR_SIZE];
  std::optional<std::stop_callback<Waker>> stop_wakeup_;

  std::vector<std::pair<std::string, std::string>> response_headers_;
  bool headers_done_ = false;
  long status_ = 0;
  std::vector<std::byte>& spill_;  // body bytes not yet read, from spill_at_
  size_t spill_at_ = 0;
  std::span<std::byte> target_;  // the waiting read's buffer, filled up to target_filled_
  size_t target_filled_ = 0;
  bool paused_ = false;
  bool finished_ = false;
  CURLcode result_ = CURLE_OK;
  Clock::time_point last_progress_;
};

Result<std::string> HttpResponse::read_all(size_t limit) {
  std::string body;
  std::byte buffer[16384];
  for (;;) {
    Result<size_t> got = read(buffer);
    if (!got) return got.status();
    if (*got == 0) return body;
    if (body.size() + *got > limit) {
      return Status::corruption(fmt::format("response body larger than {} bytes", limit));
    }
    body.append(reinterpret_cast<const char*>(buffer), *got);
  }
}

HttpClient::HttpClient(HttpClientOptions options) : options_(options) {
  init_curl_once();
  share_ = std::make_unique<Share>();
}

HttpClient::~HttpClient() = default;

std::unique_ptr<HttpClient::Connection> HttpClient::acquire() {
  {
    MutexLock lock(pool_mu_);
    if (!idle_.empty()) {
      std::unique_ptr<Connection> connection = std::move(idle_.back());
      idle_.pop_back();
      return connection;
    }
  }
  return std::make_unique<Connection>();
}

void HttpClient::release(std::unique_ptr<Connection> connection, bool reusable) {
  if (!reusable) return;  // closed with its handles
  // Options go; the multi handle's connection stays.
  curl_easy_reset(connection->easy);
  MutexLock lock(pool_mu_);
  if (idle_.size() < kMaxIdle) idle_.push_back(std::move(connection));
}

Result<std::unique_ptr<HttpResponse>> HttpClient::send(const HttpRequest& request,
                                                       const IoContext& io) {
  auto transfer = std::make_unique<Transfer>(*this, request, io);
  LB_RETURN_IF_ERROR(transfer->start());
  return std::unique_ptr<HttpResponse>(std::move(transfer));
}

std::string url_encode_path(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == '-' || c == '_' || c == '.' || c == '~' || c == '/') {
      out.push_back(c);
    } else {
      out += fmt::format("%{:02X}", u);
    }
  }
  return out;
}

}  // namespace lazyblock
