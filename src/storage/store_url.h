// Opening a store stack from the command line's words: a store URL, then the
// layers the flags ask for, innermost first: faults, simulate, retry,
// cache-dir.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "storage/disk_cache_store.h"
#include "storage/fault_store.h"
#include "storage/object_store.h"
#include "storage/retry_store.h"
#include "storage/simulate_store.h"

namespace lazyblock {

struct StoreStackOptions {
  std::optional<SimulateProfile> simulate;     // --simulate
  std::optional<FaultSpec> faults;             // --faults
  std::optional<RetryPolicy> retry;            // --retry
  std::optional<DiskCacheOptions> disk_cache;  // --cache-dir, --cache-size
  // A file:// store's directory is created if missing (for writers: pack).
  bool create_directory = false;
  // --ca-file: the CAs that https:// (and s3:// and gs:// over https)
  // servers are verified against; if empty, AWS_CA_BUNDLE's, else
  // SSL_CERT_FILE's, else the system's.
  std::string ca_file;
};

// "file:///abs/dir" or "file://relative/dir" -> FileStore. Other schemes
// (http, https, s3, gs) are refused with a message saying they are not built
// in yet; anything else is kInvalidArgument naming the accepted forms.
Result<std::shared_ptr<ObjectStore>> open_store(const std::string& url,
                                                const StoreStackOptions& options = {});

}  // namespace lazyblock
