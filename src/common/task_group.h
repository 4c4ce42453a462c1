// TaskGroup: threads started for background work (one per fetch stream),
// all waited for before their owner goes away.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "common/mutex.h"

namespace lazyblock {

class TaskGroup {
 public:
  TaskGroup() = default;
  // Waits for every task started to return.
  ~TaskGroup() { wait(); }
  TaskGroup(const TaskGroup&) = delete;
  TaskGroup& operator=(const TaskGroup&) = delete;

  // Runs `task` on a new thread. Tasks may start tasks.
  void spawn(std::function<void()> task);
  // Blocks until every task started, and every task those started, has
  // returned and its thread has exited.
  void wait();

 private:
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;  // its task has returned
  };

  Mutex mu_;
  std::vector<Worker> workers_ GUARDED_BY(mu_);  // not yet joined
};

}  // namespace lazyblock
