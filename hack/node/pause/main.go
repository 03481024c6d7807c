// The pod sandbox ("pause") process of the dev node: PID 1 of every pod, holding its
// namespaces. It waits for SIGTERM/SIGINT and reaps orphaned children meanwhile, like
// Kubernetes' own pause (which is C and needs a C toolchain; this is a static Go binary).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
