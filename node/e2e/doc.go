// Package e2e holds Stemflow's end-to-end tests: whole datacenters started in
// process, driven by real clients (headless Chromium among them) over the
// loopback interface of a private network namespace.
//
// The package has no code of its own outside its tests.
package e2e
