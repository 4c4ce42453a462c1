# lazyblock: `make run` and `make test` are the two commands of the README.
#   make build   install what is missing, build build/lazyblock and the tests
#   make run     build, then run the main job: bench fetch on both profiles
#   make test    lint, build, run every test, then again under ASan+UBSan and TSan,
#                then fuzz the header parser, the NBD server and the UFFD parsers a while
#   make lint    check locking (clang++ -Wthread-safety) and formatting (.clang-format)
#   make fuzz    fuzz the header parser, the NBD server and the UFFD parsers (libFuzzer)
#                (side by side for FUZZ_SECONDS, default 60)
#   make clean   remove the build trees

SHELL := /bin/bash
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SANITIZER_ENV = ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 \
                UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
                TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

FUZZ_SECONDS ?= 60

# Debug info in line tables only (-g1) in every tree made here: sanitizer
# reports, backtraces and perf keep function names, files and lines, and
# what is dropped (types and variables for a debugger) cost 10% (ASan+UBSan,
# -O0) to 30% (TSan, -O2) of the compile CPU, measured over five heavy files.
# A tree configured by hand keeps CMake's -g.
LINE_TABLES_OPTIMIZED = '-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG'
LINE_TABLES_DEBUG = -DCMAKE_CXX_FLAGS_DEBUG=-g1

.PHONY: deps lint build run test test-plain test-asan test-tsan test-fuzz fuzz clean

deps:
	@scripts/install-deps

# configure DIR BUILD_TYPE EXTRA_FLAGS
define configure
	@cmake -S . -B $(1) -DCMAKE_BUILD_TYPE=$(2) $(3) $(CMAKE_FLAGS) >/dev/null
endef

build: deps
	@echo "== build (build/)"
	$(call configure,build,RelWithDebInfo,$(LINE_TABLES_OPTIMIZED))
	@cmake --build build -j $(JOBS)

run: build
	@echo "== lazyblock bench fetch, simulated GCS"
	@build/lazyblock bench fetch --profile gcs --strategy full,streaming,split --iterations 20
	@echo
	@echo "== lazyblock bench fetch, simulated NFS"
	@build/lazyblock bench fetch --profile nfs --strategy full,streaming,split --iterations 20

# Lint first (make runs prerequisites in order): a locking or formatting
# error stops `make test` before the long suites.
test: lint test-plain test-asan test-tsan test-fuzz

lint: deps
	@echo "== lint: thread-safety analysis and formatting"
	$(call configure,build,RelWithDebInfo,$(LINE_TABLES_OPTIMIZED))
	@scripts/lint --jobs $(JOBS)

test-plain: build
	@echo "== tests (build/)"
	@ctest --test-dir build --output-on-failure -j $(JOBS)

# Linked as fixed-address (non-PIE) executables: as a PIE, the ASan+UBSan
# lazyblock carries 1.6 million relocations (pointers in the sanitizers'
# static data), ~0.25 s of CPU at each start, and the tests start it
# thousands of times.
test-asan: deps
	@echo "== tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)"
	$(call configure,build-asan,Debug,$(LINE_TABLES_DEBUG) -DLAZYBLOCK_SANITIZE=address$(,)undefined -DCMAKE_EXE_LINKER_FLAGS=-no-pie)
	@cmake --build build-asan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-asan --output-on-failure -j $(JOBS)

test-tsan: deps
	@echo "== tests under ThreadSanitizer (build-tsan/)"
	$(call configure,build-tsan,RelWithDebInfo,$(LINE_TABLES_OPTIMIZED) -DLAZYBLOCK_SANITIZE=thread)
	@cmake --build build-tsan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-tsan --output-on-failure -j $(JOBS)

# The header parser, the NBD server, the UFFD parsers and the frame decoder
# under libFuzzer, all four at once for FUZZ_SECONDS: a crash stops the run (and `make test`);
# the corpora grow in build-fuzz/, seeded from fuzz/corpus/. Each fuzzer's
# output is kept in build-fuzz/TARGET.log.
fuzz: deps
	@echo "== fuzzing the header parser, the NBD server, the UFFD handshake and record parsers and the frame decoder, $(FUZZ_SECONDS) s, side by side (build-fuzz/)"
	$(call configure,build-fuzz,RelWithDebInfo,$(LINE_TABLES_OPTIMIZED) -DCMAKE_CXX_COMPILER=clang++ -DLAZYBLOCK_FUZZ=ON)
	@cmake --build build-fuzz --target header_fuzz nbd_fuzz uffd_fuzz frame_fuzz -j $(JOBS)
	@targets=(header nbd uffd frame); pids=(); \
	for target in "$${targets[@]}"; do \
	  mkdir -p build-fuzz/corpus/$$target; \
	  build-fuzz/fuzz/$${target}_fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	      -artifact_prefix=build-fuzz/$${target}- build-fuzz/corpus/$$target fuzz/corpus/$$target \
	      >build-fuzz/$$target.log 2>&1 & \
	  pids+=($$!); \
	done; \
	failed=0; \
	for i in "$${!targets[@]}"; do \
	  wait $${pids[$$i]} || failed=1; \
	  echo "-- $${targets[$$i]}_fuzz"; \
	  grep -E "DONE|number_of_executed_units|ERROR|SUMMARY|deadly|Test unit written|==[0-9]+==" \
	      build-fuzz/$${targets[$$i]}.log || true; \
	done; \
	exit $$failed

# Four fuzzers side by side for 30 s on CI's two cores: each gets about 15 s
# of CPU, in less time than the 20 s each they once had one after another.
test-fuzz:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=30

clean:
	rm -rf build build-asan build-tsan build-fuzz

, := ,
