# The longest tests, with roughly their seconds under a sanitizer, as each
# test's COST: `ctest -j` starts the costliest first, so that a long test
# does not start last and stretch the run (a fresh build tree has no
# timings of its own to go by). ctest includes this file after the tests
# that gtest_discover_tests found; a name no longer found is passed over.
set(_lazyblock_slow_tests
  S3CliTest.PackExportAndCatThroughABucket 31
  DataSafetyTest.AcknowledgedFlushesSurviveKillNineAtRandomMoments 29
  CompressedTest.ChainsMixingVersionsAndCodecsExportByteExact 28
  CliTest.BenchHitJsonHasTheDocumentedShape 27
  ImageCliTest.DamagedHeadersAreClearErrorsNeverCrashes 25
  ImageCliTest.EachGenerationStoresLittleMoreThanItsChanges 23
  DaemonTest.EightDisksOfOneTemplateFetchItOnceAndKeepTheirWritesApart 21
  SpaceTest.ExportOfAnImageSixteenTimesTheSizeOfTmpdirIsByteExact 20
  SpaceTest.CatOfAnObjectSixteenTimesTheSizeOfTmpdirIsByteExact 20
  SpaceTest.ServeNbdOnASmallFullTmpdirFailsReadsUntilThereIsSpaceThenServesEverything 20
  SpaceTest.ACacheFileCutShortUnderACopyIsFetchedAgainOrAnIoErrorNeverACrash 20
  CompressedTest.PackCompressRoundTripsThroughExportAndTheReference 18
  NbdTest.ClientsThatDoNotReadRepliesHoldBoundedMemory 17
  ImageCliTest.AChainOfFiveGenerationsExportsEachAsPacked 16
  CompressedTest.AChainMixingPlainAndCompressedPacksRoundTrips 13
  ServerLimitsTest.NbdRefusesConnectionsPastItsLimitAndClosesSilentOnes 12
  ServerLimitsTest.NbdOutOfDescriptorsKeepsAccepting 12
  ServerLimitsTest.UffdOutOfDescriptorsKeepsAccepting 10
  ServerLimitsTest.UffdRefusesConnectionsPastItsLimitAndClosesSilentOnes 10
  SpaceTest.AServeNbdKilledMidFillLeavesNoTemporaryFileAfterTheNextRun 10
  SpaceTest.ACatKilledMidFillLeavesNoPartialFile 10
  HttpCliTest.CatIsByteExact 10
)
while(_lazyblock_slow_tests)
  list(POP_FRONT _lazyblock_slow_tests _name _cost)
  set_tests_properties(${_name} PROPERTIES COST ${_cost})
endwhile()
