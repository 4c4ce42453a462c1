// TaskGroup: threads started for background work (one per fetch stream),
// all waited for before their owner goes away.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>

namespace lazyblock {

class TaskGroup {
 public:
  TaskGroup() = default;
  // Waits for every task started to return.
  ~TaskGroup() { wait(); }
  TaskGroup(const TaskGroup&) = delete;
  TaskGroup& operator=(const TaskGroup&) = delete;

  // Runs `task` on a new thread.
  void spawn(std::function<void()> task);
  // Blocks until no task is running.
  void wait();

 private:
  std::mutex mu_;
  std::condition_variable idle_;
  int running_ = 0;  // guarded by mu_
};

}  // namespace lazyblock
