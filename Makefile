# lazyblock: `make run` and `make test` are the two commands of the README.
#   make build   install what is missing, build build/lazyblock and the tests
#   make run     build, then run the main job: bench fetch on both profiles
#   make test    lint, build, run every test, then again under ASan+UBSan and TSan,
#                then fuzz the header parser, the NBD server and the UFFD parsers a while
#   make lint    check locking (clang++ -Wthread-safety) and formatting (.clang-format)
#   make fuzz    fuzz the header parser, the NBD server and the UFFD parsers (libFuzzer)
#                (FUZZ_SECONDS each, default 60)
#   make clean   remove the build trees

SHELL := /bin/bash
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SANITIZER_ENV = ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 \
                UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
                TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

FUZZ_SECONDS ?= 60

.PHONY: deps lint build run test test-plain test-asan test-tsan test-fuzz fuzz clean

deps:
	@scripts/install-deps

# configure DIR BUILD_TYPE EXTRA_FLAGS
define configure
	@cmake -S . -B $(1) -DCMAKE_BUILD_TYPE=$(2) $(3) $(CMAKE_FLAGS) >/dev/null
endef

build: deps
	@echo "== build (build/)"
	$(call configure,build,RelWithDebInfo,)
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
	$(call configure,build,RelWithDebInfo,)
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
	$(call configure,build-asan,Debug,-DLAZYBLOCK_SANITIZE=address$(,)undefined -DCMAKE_EXE_LINKER_FLAGS=-no-pie)
	@cmake --build build-asan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-asan --output-on-failure -j $(JOBS)

test-tsan: deps
	@echo "== tests under ThreadSanitizer (build-tsan/)"
	$(call configure,build-tsan,RelWithDebInfo,-DLAZYBLOCK_SANITIZE=thread)
	@cmake --build build-tsan -j $(JOBS)
	@$(SANITIZER_ENV) ctest --test-dir build-tsan --output-on-failure -j $(JOBS)

# The header parser and the NBD server under libFuzzer, FUZZ_SECONDS each:
# a crash stops the run (and `make test`); the corpora grow in build-fuzz/,
# seeded from fuzz/corpus/.
fuzz: deps
	@echo "== fuzzing the header parser, the NBD server and the UFFD handshake and record parsers, $(FUZZ_SECONDS) s each (build-fuzz/)"
	$(call configure,build-fuzz,RelWithDebInfo,-DCMAKE_CXX_COMPILER=clang++ -DLAZYBLOCK_FUZZ=ON)
	@cmake --build build-fuzz --target header_fuzz nbd_fuzz uffd_fuzz frame_fuzz -j $(JOBS)
	@for target in header nbd uffd frame; do \
	  mkdir -p build-fuzz/corpus/$$target; \
	  echo "-- $${target}_fuzz"; \
	  build-fuzz/fuzz/$${target}_fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	      -artifact_prefix=build-fuzz/$${target}- build-fuzz/corpus/$$target fuzz/corpus/$$target 2>&1 \
	    | grep -E "DONE|number_of_executed_units|ERROR|SUMMARY|deadly|Test unit written|==[0-9]+=="; \
	  [[ $${PIPESTATUS[0]} -eq 0 ]] || exit 1; \
	done

test-fuzz:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=20

clean:
	rm -rf build build-asan build-tsan build-fuzz

, := ,
